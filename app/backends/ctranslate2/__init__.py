"""The local engine: CTranslate2 behind our dynamic batcher. Importing this package does not
load CTranslate2: `kernels.choose_cpu_kernels()` must run first."""
