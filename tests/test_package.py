import sealtrail


def test_all_is_sorted_and_exported() -> None:
    assert sealtrail.__all__ == sorted(sealtrail.__all__)
    for name in sealtrail.__all__:
        assert hasattr(sealtrail, name), name


def test_every_error_derives_from_root() -> None:
    for name in sealtrail.__all__:
        obj = getattr(sealtrail, name)
        if isinstance(obj, type) and issubclass(obj, Exception):
            assert issubclass(obj, sealtrail.SealtrailError)
