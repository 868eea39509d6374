"""MatchAnything RoMa, complete (roma_plus): roma_full's coarse half + refiners 16..1 + upsampling pass.

Modules: ``refiner`` (ConvRefiner, local correlation), ``model`` (RomaPlus), ``weights`` (603 + 343
tensor map), ``preprocess`` (upstream's resize), ``export`` (graphs and the exact-GP split),
``sampling`` (balanced / top-k match sampling), ``postprocess`` (Matches), ``hooks``; for torch on GPUs
``split_products`` (the split precision policies), ``replay`` (CUDA graphs of the coarse regions) and the
Triton kernels ``piece_kernel``, ``attention_kernel`` and ``kde_kernel``.
"""
