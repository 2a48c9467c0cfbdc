"""Interchangeable implementations of one operation each, registered by name.

Each module holds the variants of one operation behind one signature, in a `Registry` whose keys
are the only place a variant's name is spelled (`Runtime` validates against them, the CLIs list
them): `experts` (routed-expert FFN), `attention` (MLA's attention over the latent, with its
`CORES`), `cross_entropy`. `linear` holds the matmuls the layers run (full precision or FP8 GEMMs)
and the `Fp8Weight` they accept. `dispatch` picks a variant for a platform and a shape and owns
every threshold. Nothing here imports a layer, the model or the runtime config.
"""
