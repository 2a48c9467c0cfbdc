"""Flax Linen building blocks: norm, rope, MLA, MoE, MLP. Pure modules over plain pytrees."""
