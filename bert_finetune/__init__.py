"""bert-finetune: fine-tune BERT-family models for text classification, one loop for one device and DDP."""
__version__ = "0.1.0"
