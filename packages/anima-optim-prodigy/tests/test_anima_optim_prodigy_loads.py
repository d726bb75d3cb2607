"""The distribution is found through its real entry point and loads cleanly beside core."""

from anima_core.plugin_host import make_host


def test_plugin_is_loaded_through_its_entry_point():
    host = make_host(strict=True)
    record = next(r for r in host.records if r.distribution == "anima-optim-prodigy")
    assert record.status == "loaded", record.error
    assert record.name == "anima_optim_prodigy"
    host.registry.check()
