"""A local instruction LLM for the prompt set: split prompts into {content, style}, invent new ones.

Any transformers causal LM folder with a chat template works (Mistral-7B-Instruct, Qwen2.5-Instruct,
Llama-3-Instruct, ...): ``AutoModelForCausalLM`` + ``AutoTokenizer`` from a local path, safetensors only,
no remote code. Generation is batched with left padding. The answer is constrained two ways: the
assistant turn is pre-filled with the opening of the JSON object (``{"content": "``), so the model can
only continue it, and every answer is parsed and validated; anything that does not parse into the
required string fields is *malformed*, skipped and counted, never guessed at.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path

import torch

LLM_HELP = (
    "a transformers causal-LM folder of an instruction model (config.json + *.safetensors + tokenizer "
    "files with a chat template), e.g. mistralai/Mistral-7B-Instruct-v0.3 or Qwen/Qwen2.5-7B-Instruct"
)
MAX_FIELD_CHARS = 300

EXTRACT_SYSTEM = (
    "You split text-to-image prompts into two parts. 'content' is what the picture shows: the people, "
    "animals and objects, what they do and where, in plain words. 'style' is how it is rendered: medium, "
    "art movement, artist, lighting, colours, camera. Answer with one JSON object "
    '{"content": "...", "style": "..."} and nothing else; use "" for a missing style.'
)
EXTRACT_EXAMPLE = (
    "a man and a dog hiking in the wilderness during the day, abstract, geometric, cubist influences, "
    "bold color blocks, trending on artstation",
    {"content": "a man and a dog hiking in the wilderness during the day",
     "style": "abstract, geometric, Cubist influences, bold color blocks"},
)  # fmt: skip

GENERATE_SYSTEM = {
    "content": (
        "You write contents for a text-to-image dataset: one short scene with people, animals or objects a "
        "detector can find, what they do and where; no style words. Answer with one JSON object "
        '{"content": "..."} and nothing else.'
    ),
    "style": (
        "You write styles for a text-to-image dataset: a comma-separated list of medium, art movement, "
        "lighting, colour and rendering words; no subjects. Answer with one JSON object "
        '{"style": "..."} and nothing else.'
    ),
}


class LLMLoadError(ValueError):
    """The LLM folder is missing or not a causal LM with a chat template; the message says what belongs."""


def check_llm_folder(folder: str | Path) -> Path:
    """Cheap checks (no weights read): a causal-LM config, safetensors weights, a chat template."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from .pickscore import config_model_type

    folder = Path(folder)
    model_type = config_model_type(folder, LLMLoadError, "LLM", LLM_HELP)
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise LLMLoadError(
            f"{folder} holds a {model_type!r} model, which is not a causal LM: give {LLM_HELP}"
        )
    if not any(folder.glob("*.safetensors")):
        raise LLMLoadError(f"{folder} has no .safetensors weights (pickled .bin files are never loaded)")
    tok_cfg = folder / "tokenizer_config.json"
    has_template = (folder / "chat_template.jinja").is_file() or (folder / "chat_template.json").is_file()
    if tok_cfg.is_file() and not has_template:
        has_template = "chat_template" in json.loads(tok_cfg.read_text("utf-8"))
    if not has_template:
        raise LLMLoadError(
            f"{folder} has no chat template (tokenizer_config.json 'chat_template' or chat_template.jinja): "
            "use the instruction-tuned variant of the model"
        )
    return folder


class InstructLLM:
    """A loaded causal LM + tokenizer; ``chat`` answers many conversations in batches."""

    def __init__(self, model, tokenizer, device: str, batch_size: int = 16, max_new_tokens: int = 96):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.tokenizer.padding_side = "left"  # generation continues at the right end of every row
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.device = device
        self.batch_size = int(batch_size)
        self.max_new_tokens = int(max_new_tokens)

    @classmethod
    def from_pretrained(
        cls,
        folder: str | Path,
        device: str = "auto",
        dtype: str = "auto",
        batch_size: int = 16,
        max_new_tokens: int = 96,
    ) -> InstructLLM:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from .pickscore import resolve_device

        folder = check_llm_folder(folder)
        device = resolve_device(device)
        torch_dtype = (
            (torch.bfloat16 if device.startswith("cuda") else torch.float32)
            if dtype == "auto"
            else getattr(torch, dtype)
        )
        try:
            tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
            model = AutoModelForCausalLM.from_pretrained(
                folder, dtype=torch_dtype, use_safetensors=True, local_files_only=True
            )
        except (OSError, ValueError) as e:
            raise LLMLoadError(f"cannot load the LLM from {folder}: {e}. It must be {LLM_HELP}.") from e
        return cls(model.to(device), tok, device, batch_size, max_new_tokens)

    @torch.inference_mode()
    def chat(
        self, conversations: Sequence[list[dict]], prefill: str = "", sample: bool = False, seed: int = 0
    ) -> list[str]:
        """The assistant's answer to each conversation, ``prefill`` + what the model wrote after it."""
        out: list[str] = []
        for b, s in enumerate(range(0, len(conversations), self.batch_size)):
            texts = [
                self.tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False) + prefill
                for c in conversations[s : s + self.batch_size]
            ]
            # The template already holds the special tokens it wants (BOS etc.).
            enc = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            enc = {k: v.to(self.device) for k, v in enc.items()}
            kwargs: dict = {
                "max_new_tokens": self.max_new_tokens,
                "pad_token_id": self.tokenizer.pad_token_id,
            }
            if sample:
                torch.manual_seed(seed * 100003 + b)  # the same seed gives the same answers
                kwargs.update(do_sample=True, temperature=1.0, top_p=0.95)
            else:
                kwargs.update(do_sample=False)
            gen = self.model.generate(**enc, **kwargs)
            new = gen[:, enc["input_ids"].shape[1] :]
            out.extend(prefill + t for t in self.tokenizer.batch_decode(new, skip_special_tokens=True))
        return out


def parse_json_answer(text: str, fields: Sequence[str]) -> dict[str, str] | None:
    """The first JSON object in ``text`` if it has every field as a string of sane length, else None."""
    start = text.find("{")
    if start < 0:
        return None
    try:
        obj, _ = json.JSONDecoder().raw_decode(text[start:])
    except ValueError:
        return None
    if not isinstance(obj, dict):
        return None
    out = {}
    for f in fields:
        v = obj.get(f)
        if not isinstance(v, str) or len(v) > MAX_FIELD_CHARS:
            return None
        out[f] = v
    return out


def extraction_conversation(prompt: str) -> list[dict]:
    example, answer = EXTRACT_EXAMPLE
    return [
        {"role": "system", "content": EXTRACT_SYSTEM},
        {"role": "user", "content": example},
        {"role": "assistant", "content": json.dumps(answer)},
        {"role": "user", "content": prompt},
    ]


def extract_content_style(llm: InstructLLM, prompts: Sequence[str]) -> tuple[list[dict[str, str]], list[str]]:
    """``({content, style}`` per well-formed answer, malformed raw answers)``; content must be non-empty."""
    answers = llm.chat([extraction_conversation(p) for p in prompts], prefill='{"content": "')
    good, bad = [], []
    for a in answers:
        parsed = parse_json_answer(a, ("content", "style"))
        if parsed is None or not parsed["content"].strip():
            bad.append(a)
        else:
            good.append(parsed)
    return good, bad


def generate_items(
    llm: InstructLLM, kind: str, n: int, examples: Sequence[str], seed: int = 0
) -> tuple[list[str], list[str]]:
    """Ask for ``n`` new contents or styles (sampled, seeded); ``(items, malformed raw answers)``."""
    if kind not in GENERATE_SYSTEM:
        raise ValueError(f"kind must be 'content' or 'style', got {kind!r}")
    rng = random.Random(f"{seed}/{kind}")
    convs = []
    for _ in range(n):
        shown = rng.sample(list(examples), min(5, len(examples)))
        convs.append(
            [
                {"role": "system", "content": GENERATE_SYSTEM[kind]},
                {"role": "user", "content": "Examples:\n" + "\n".join(shown) + f"\nWrite one new {kind}."},
            ]
        )
    answers = llm.chat(convs, prefill='{"' + kind + '": "', sample=True, seed=seed)
    good, bad = [], []
    for a in answers:
        parsed = parse_json_answer(a, (kind,))
        if parsed is None or not parsed[kind].strip():
            bad.append(a)
        else:
            good.append(parsed[kind])
    return good, bad
