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


def test_public_names_resolve_to_the_api_in_a_fresh_interpreter() -> None:
    """``sealtrail.context`` is the function even after the submodule of the same name was
    imported, and the lazily loaded names resolve (and a light import stays light)."""
    import subprocess
    import sys

    code = (
        "import sealtrail._verify_worker, sys\n"
        "assert 'sealtrail.trail' not in sys.modules\n"
        "import sealtrail.context, sealtrail\n"
        "f = sealtrail.context\n"
        "assert callable(f) and f.__module__ == 'sealtrail.context'\n"
        "from sealtrail import connect, Trail\n"
        "assert sealtrail.connect is connect and 'connect' in dir(sealtrail)\n"
        "try:\n    sealtrail.no_such_name\nexcept AttributeError:\n    pass\n"
        "else:\n    raise SystemExit('no AttributeError')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_capture_backends_share_one_capture_error() -> None:
    from sealtrail.capture import orm, pg

    assert pg.CaptureError is orm.CaptureError is sealtrail.CaptureError
    assert issubclass(sealtrail.CaptureError, sealtrail.SealtrailError)
