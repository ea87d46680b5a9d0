"""encore-pl: lifelong sequential knowledge editing (ENCORE, MEMIT, AlphaEdit) on PyTorch Lightning."""
