"""Seeing inside: image grids, denoising GIFs, schedule plots."""
