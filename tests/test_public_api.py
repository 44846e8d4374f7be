import cobs_jax


def test_all_names_import_and_have_docstrings():
    for name in cobs_jax.__all__:
        obj = getattr(cobs_jax, name)
        if callable(obj) or isinstance(obj, type):
            assert obj.__doc__ and obj.__doc__.strip(), name
