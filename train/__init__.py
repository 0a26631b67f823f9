"""MUMU training: ``python -m train --config FILE`` (see docs/TRAINING.md)."""
