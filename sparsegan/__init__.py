"""Sparse-GAN (Zhou et al., ISBI 2020) and its Table 1 baselines for retinal OCT anomaly detection."""
