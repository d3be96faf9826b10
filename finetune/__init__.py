"""U-Net fine-tuning across encoder initialisations and label budgets, metrics and reports."""
