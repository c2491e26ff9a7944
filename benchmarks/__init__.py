"""Side-by-side benchmarks of mlo against hand-written torch.func code, Betty, TorchOpt and higher.

Run `python -m benchmarks --help`. Nothing in the `mlo` package imports from here.
"""
