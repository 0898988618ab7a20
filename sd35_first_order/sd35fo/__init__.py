"""SD3.5-Medium first-order reward fine-tuning: VGG-Flow, its pruned baseline and RSM (paper Figure 5(a, b))."""
