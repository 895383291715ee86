"""This project's Triton kernels (import name `lsm_kernels`): pure functions on tensors, no nn.Module.

    lsm_kernels.diag     chunked forward/backward of the diagonal-decay family (`chunk_diag`)
    lsm_kernels.delta    chunked forward/backward of the delta family (`chunk_delta`)
    lsm_kernels.ttt      TTT-Linear's mini-batch chunk, forward/backward (`chunk_ttt_linear`) and its decode step (`ttt_step`)
    lsm_kernels.decode   fused one-token decode steps, single memory (`recurrent_step`) and MoM (`mom_step`)
    lsm_kernels.conv     the layers' short conv + SiLU (+ L2 norm), dense, packed, and routed (MoM) rows
    lsm_kernels.norm     the readout's gated RMSNorm
    lsm_kernels._common  helpers of every kernel file: tuning, device check, chunk layout, precision, decay kinds

Importing this package does not import triton; the submodules do.
"""
