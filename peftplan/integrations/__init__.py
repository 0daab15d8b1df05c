"""Integrations with the training stacks users run (transformers' Trainer and TRL's trainers).

`peftplan.integrations.transformers.PeftplanCallback` imports torch and transformers: import it from there.
"""
