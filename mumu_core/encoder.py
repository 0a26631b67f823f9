"""The MUMU encoder: Idefics2 with its perceiver resampler removed.

Idefics2 normally compresses each image to 64 tokens with a perceiver resampler. MUMU removes it, so
every ViT patch, after the modality-projection MLP, becomes one token of the language model's input:
an image of side ``14*k`` gives ``k*k`` tokens. Transformers has no switch for this, so the resampler
module is replaced by :class:`PerceiverRemoved` right after loading, and the encoder runs the three
stages itself (vision tower -> modality projection -> language model over the interleaved sequence),
which also lets images of different sizes sit in one prompt without padding the vision batch.

``keep_perceiver=True`` (Finding 1's ablation, "perceiver removed beats perceiver kept") leaves the
resampler in place: each image then becomes the perceiver's ``n_latents`` tokens, whatever its token
budget (the budget still sets the side the image is resized to); everything else is identical.

Pixels are prepared in our own code (``prompt.prepare_image`` + the folder's mean/std), never by
transformers' image processors, whose PIL and torchvision variants differ.

Text typed by the user never becomes a control token: a prompt whose text contains one of the
tokenizer's special or added tokens (``<image>``, ``<fake_token_around_image>``,
``<end_of_utterance>``, ``<s>``, ...) is refused with a ``PromptError`` naming it (escaping would
silently change what the user wrote; images go in through placeholders only).
"""

from __future__ import annotations

import gc
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .presets import FAKE_IMAGE_TOKEN, IMAGE_TOKEN
from .prompt import ImageRef, InterleavedPrompt, PromptError, prepare_image

# Linear layers that receive the VLM LoRA: Mistral's attention and MLP projections and the
# vision-to-LLM MLP. The vision tower is never a target (the paper keeps the ViT frozen).
VLM_LORA_TARGETS = (
    r".*text_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"
    r"|.*connector\.modality_projection\.(gate|up|down)_proj"
)

VLM_FOLDER_HELP = (
    "a Hugging Face Idefics2 folder: config.json, model*.safetensors (+ index), tokenizer.json with "
    "tokenizer_config.json, and preprocessor_config.json (e.g. the files of HuggingFaceM4/idefics2-8b)"
)
# Idefics2's control tokens (the tokenizer's own special / added tokens are checked too once loaded):
# typed in a prompt they would act as image markers or end the utterance.
CONTROL_TOKENS = (IMAGE_TOKEN, FAKE_IMAGE_TOKEN, "<end_of_utterance>", "<s>", "</s>", "<unk>")


def check_prompt_text(prompt: InterleavedPrompt, tokens: Sequence[str] = CONTROL_TOKENS) -> None:
    """Refuse text segments that contain a control token (they must not become control tokens)."""
    for seg in prompt.segments:
        if not isinstance(seg, str):
            continue
        found = sorted({t for t in tokens if t and t in seg})
        if found:
            raise PromptError(
                f"the prompt text contains {', '.join(repr(t) for t in found)}, a control token of the "
                "VLM's tokenizer; remove or reword it (reference images go in through <image> / <imageN> "
                "placeholders only)"
            )


class PerceiverRemoved(nn.Module):
    """Stands where Idefics2's perceiver resampler was and passes every patch through unchanged."""

    def forward(self, context: torch.Tensor, attention_mask: torch.Tensor | None = None, **_) -> torch.Tensor:
        return context


@dataclass
class EncoderOutput:
    hidden_states: torch.Tensor  # (B, N, D)
    attention_mask: torch.Tensor  # (B, N) bool, right padding
    image_index: torch.Tensor  # (B, N) long: -1 at text tokens, k at the prompt's k-th image


class EncoderLoadError(FileNotFoundError):
    pass


def check_vlm_folder(folder: str | Path) -> Path:
    folder = Path(folder)
    if not folder.is_dir():
        raise EncoderLoadError(f"VLM folder {folder} does not exist. Put {VLM_FOLDER_HELP} there.")
    # Every tokenizer file is required: without tokenizer_config.json (or tokenizer.json, with a
    # tokenizer.model beside it) transformers silently builds a tokenizer with other special tokens.
    missing = [f for f in ("config.json", "preprocessor_config.json") if not (folder / f).is_file()]
    if not any(folder.glob("*.safetensors")):
        missing.append("model*.safetensors")
    missing += [f for f in ("tokenizer.json", "tokenizer_config.json") if not (folder / f).is_file()]
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, AttributeError) as e:
            raise EncoderLoadError(f"VLM folder {folder}: {index.name} is not a valid index ({e})") from None
        missing += [f for f in shards if not (folder / f).is_file()]
    if missing:
        raise EncoderLoadError(
            f"VLM folder {folder} lacks {', '.join(missing)}. It must hold {VLM_FOLDER_HELP}."
        )
    return folder


class MumuEncoder(nn.Module):
    def __init__(
        self,
        vlm: nn.Module,
        tokenizer,
        image_mean: Sequence[float],
        image_std: Sequence[float],
        hidden_state_layer: int = -1,
        keep_perceiver: bool = False,
    ) -> None:
        super().__init__()
        if keep_perceiver:
            if isinstance(vlm.connector.perceiver_resampler, PerceiverRemoved):
                raise EncoderLoadError(
                    "keep_perceiver=True but this VLM's perceiver resampler was already removed: "
                    "load the VLM folder again with keep_perceiver=True"
                )
        else:
            remove_perceiver(vlm)
        self.keep_perceiver = keep_perceiver
        self.vlm = vlm
        self.tokenizer = tokenizer
        self.hidden_state_layer = hidden_state_layer
        self.register_buffer("image_mean", torch.tensor(image_mean).view(3, 1, 1), persistent=False)
        self.register_buffer("image_std", torch.tensor(image_std).view(3, 1, 1), persistent=False)
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        self.fake_token_id = tokenizer.convert_tokens_to_ids(FAKE_IMAGE_TOKEN)
        for tok, tid in ((IMAGE_TOKEN, self.image_token_id), (FAKE_IMAGE_TOKEN, self.fake_token_id)):
            if tid is None or tid == tokenizer.unk_token_id:
                raise EncoderLoadError(
                    f"the tokenizer has no {tok} token: it is not Idefics2's tokenizer (check the folder's "
                    "tokenizer.json and tokenizer_config.json)"
                )
        specials = set(getattr(tokenizer, "all_special_tokens", []) or [])
        specials |= set(tokenizer.get_added_vocab()) if hasattr(tokenizer, "get_added_vocab") else set()
        self.control_tokens = tuple(sorted(specials | set(CONTROL_TOKENS)))
        if self.image_token_id != vlm.config.image_token_id:
            raise EncoderLoadError(
                f"the tokenizer's {IMAGE_TOKEN} id ({self.image_token_id}) differs from the model config's "
                f"image_token_id ({vlm.config.image_token_id}): tokenizer and weights come from different models"
            )

    @classmethod
    def from_pretrained(
        cls,
        folder: str | Path,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        hidden_state_layer: int = -1,
        keep_perceiver: bool = False,
    ) -> MumuEncoder:
        """Load a local Idefics2 folder. The perceiver resampler is removed (MUMU) unless ``keep_perceiver``."""
        from transformers import AutoTokenizer, Idefics2ForConditionalGeneration

        folder = check_vlm_folder(folder)
        model = Idefics2ForConditionalGeneration.from_pretrained(folder, dtype=dtype)
        vlm = model.model
        del model  # drops lm_head: MUMU reads hidden states, never logits
        tokenizer = AutoTokenizer.from_pretrained(folder)
        pre = json.loads((folder / "preprocessor_config.json").read_text())
        enc = cls(
            vlm,
            tokenizer,
            pre.get("image_mean", [0.5] * 3),
            pre.get("image_std", [0.5] * 3),
            hidden_state_layer,
            keep_perceiver,
        )
        return enc.to(device).eval()

    # -- properties -------------------------------------------------------------------------------
    @property
    def hidden_size(self) -> int:
        return self.vlm.config.text_config.hidden_size

    @property
    def patch_size(self) -> int:
        return self.vlm.config.vision_config.patch_size

    @property
    def device(self) -> torch.device:
        return self.image_mean.device

    @property
    def dtype(self) -> torch.dtype:
        return self.vlm.get_input_embeddings().weight.dtype

    @property
    def n_latents(self) -> int:
        """Tokens per image with the perceiver kept (its number of latents)."""
        return int(self.vlm.config.perceiver_config.resampler_n_latents)

    def image_seq_len(self, ref: ImageRef) -> int:
        """How many ``<image>`` tokens ``ref`` takes in the sequence: its budget, or n_latents when kept."""
        return self.n_latents if self.keep_perceiver else ref.tokens

    # -- inputs -----------------------------------------------------------------------------------
    def pixels(self, ref: ImageRef) -> torch.Tensor:
        """(3, S, S) normalised pixels of one reference image."""
        img = prepare_image(ref.image, ref.tokens, ref.mask, self.patch_size)
        x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
        return (x.to(self.device) - self.image_mean) / self.image_std

    def tokenize(self, prompt: InterleavedPrompt) -> list[int]:
        # One string with the image tokens inline, tokenized in one call, as Idefics2's processor
        # does: tokenizing segments separately would add sentencepiece prefix spaces mid-sentence.
        check_prompt_text(prompt, self.control_tokens)
        parts = [self.tokenizer.bos_token or ""]
        for s in prompt.segments:
            parts.append(
                s
                if isinstance(s, str)
                else FAKE_IMAGE_TOKEN + IMAGE_TOKEN * self.image_seq_len(s) + FAKE_IMAGE_TOKEN
            )
        ids = self.tokenizer("".join(parts), add_special_tokens=False)["input_ids"]
        expected = sum(self.image_seq_len(r) for r in prompt.images)
        got = sum(1 for i in ids if i == self.image_token_id)
        if got != expected:  # the text itself contained "<image>"-like special tokens
            raise PromptError(
                f"the prompt text produced {got} image tokens but its images need {expected}: "
                f"remove literal {IMAGE_TOKEN} / {FAKE_IMAGE_TOKEN} strings from the text"
            )
        return ids

    # -- forward ----------------------------------------------------------------------------------
    def image_features(self, refs: Sequence[ImageRef]) -> list[torch.Tensor]:
        """Per image, (tokens, D) features after the vision tower and modality projection (and, when kept,
        the perceiver resampler: (n_latents, D))."""
        feats: list[torch.Tensor | None] = [None] * len(refs)
        by_side: dict[int, list[int]] = {}
        for i, r in enumerate(refs):
            by_side.setdefault(r.tokens, []).append(i)
        for idx in by_side.values():  # same token count -> same side: one vision batch, no padding
            px = torch.stack([self.pixels(refs[i]) for i in idx]).to(self.dtype)
            h = self.vlm.vision_model(pixel_values=px).last_hidden_state
            h = self.vlm.connector.modality_projection(h)
            if self.keep_perceiver:
                # Every patch is real (no padding within a same-side batch), as Idefics2's own
                # get_image_features passes for unpadded images.
                full = torch.ones(h.shape[:2], dtype=torch.bool, device=h.device)
                h = self.vlm.connector.perceiver_resampler(context=h, attention_mask=full)
            for j, i in enumerate(idx):
                feats[i] = h[j]
        return feats  # type: ignore[return-value]

    def forward(self, prompts: Sequence[InterleavedPrompt]) -> EncoderOutput:
        if not prompts:
            raise ValueError("encode() needs at least one prompt")
        ids = [self.tokenize(p) for p in prompts]
        n = max(len(i) for i in ids)
        pad = self.tokenizer.pad_token_id or 0
        input_ids = torch.full((len(ids), n), pad, dtype=torch.long, device=self.device)
        mask = torch.zeros(len(ids), n, dtype=torch.bool, device=self.device)
        image_index = torch.full((len(ids), n), -1, dtype=torch.long, device=self.device)
        for b, seq in enumerate(ids):
            input_ids[b, : len(seq)] = torch.tensor(seq, device=self.device)
            mask[b, : len(seq)] = True
        embeds = self.vlm.get_input_embeddings()(input_ids)

        refs = [r for p in prompts for r in p.images]
        if refs:
            feats = self.image_features(refs)
            k = 0
            rows = []
            for b, p in enumerate(prompts):
                positions = (input_ids[b] == self.image_token_id).nonzero().squeeze(1)
                start = 0
                for j, r in enumerate(p.images):
                    n_tok = self.image_seq_len(r)
                    image_index[b, positions[start : start + n_tok]] = j
                    start += n_tok
                rows.append(torch.cat(feats[k : k + len(p.images)]) if p.images else None)
                k += len(p.images)
            # masked_scatter fills image positions in row-major order, which is prompt order.
            flat = torch.cat([r for r in rows if r is not None]).to(embeds.dtype)
            embeds = embeds.masked_scatter((image_index >= 0)[..., None], flat)

        want_all = self.hidden_state_layer != -1
        out = self.vlm.text_model(
            inputs_embeds=embeds, attention_mask=mask.long(), output_hidden_states=want_all, use_cache=False
        )
        # -1 is the final (normed) output; any other index picks that layer's raw hidden states.
        hidden = out.last_hidden_state if not want_all else out.hidden_states[self.hidden_state_layer]
        return EncoderOutput(hidden, mask, image_index)

    encode = forward

    # -- training helpers -------------------------------------------------------------------------
    def enable_gradient_checkpointing(self) -> None:
        kwargs = {"use_reentrant": False}
        # transformers 5.x renamed it; the old name warns and goes away in v6.
        if hasattr(self.vlm, "activation_checkpointing_enable"):
            self.vlm.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            self.vlm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)

    def freeze_vision(self) -> None:
        self.vlm.vision_model.requires_grad_(False)

    def add_lora(self, rank: int = 8, alpha: float = 8.0, dropout: float = 0.0) -> None:
        """Attach a peft LoRA to the language model and the modality projection (never the ViT)."""
        from peft import LoraConfig, inject_adapter_in_model

        cfg = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=VLM_LORA_TARGETS)
        inject_adapter_in_model(cfg, self.vlm)

    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        from peft import get_peft_model_state_dict

        return get_peft_model_state_dict(self.vlm)

    def load_lora_state_dict(self, state_dict: dict[str, torch.Tensor], rank: int, alpha: float) -> None:
        from peft import set_peft_model_state_dict

        if not self.has_lora():
            self.add_lora(rank, alpha)
        result = set_peft_model_state_dict(self.vlm, state_dict)
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise ValueError(f"VLM LoRA has {len(unexpected)} keys this model lacks, e.g. {unexpected[:3]}")

    def has_lora(self) -> bool:
        from peft.tuners.lora import LoraLayer

        return any(isinstance(m, LoraLayer) for m in self.vlm.modules())

    def merge_lora(self) -> None:
        """Fold the LoRA into the base weights (peft's merge), for inference."""
        from peft.tuners.lora import LoraLayer

        for m in self.vlm.modules():
            if isinstance(m, LoraLayer):
                m.merge()


def remove_perceiver(vlm: nn.Module) -> None:
    """Replace Idefics2's perceiver resampler with a pass-through and free its weights."""
    connector = vlm.connector
    if isinstance(connector.perceiver_resampler, PerceiverRemoved):
        return
    connector.perceiver_resampler = PerceiverRemoved()
    gc.collect()
