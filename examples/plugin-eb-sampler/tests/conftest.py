# The dllm-decode testing kit's fixtures (dllm_kit, random_logits_model) for these tests.
pytest_plugins = ["dllm_decode.testing.pytest_plugin"]
