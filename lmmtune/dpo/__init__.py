"""Preference tuning (DPO) on the QLoRA stack, through TRL's DPOTrainer."""
