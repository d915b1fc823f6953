"""Small-scale training helpers used to build the built-in demo model (hack/train_demo_model.py).

Kept in the package (not only in hack/) so that tests can check the tokenizer builder and the
masked-diffusion objective directly. Nothing here is imported by the serving path.
"""
