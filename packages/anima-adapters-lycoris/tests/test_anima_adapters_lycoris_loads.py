"""The distribution is found through its real entry point and loads cleanly beside core."""

from anima_core.plugin_host import make_host


def test_plugin_is_loaded_through_its_entry_point_and_registers_three_adapters():
    host = make_host(strict=True)
    record = next(r for r in host.records if r.distribution == "anima-adapters-lycoris")
    assert record.status == "loaded", record.error
    assert record.name == "anima_adapters_lycoris"
    host.registry.check()
    assert sorted(record.provides["adapter"]) == ["locon", "loha", "lokr"]
    for name in ("lokr", "loha", "locon"):
        assert host.registry.get("adapter", name).plugin is record
        assert host.registry.spec("adapter", name).file_deltas is not None


def test_plugin_module_imports_neither_torch_nor_lycoris():
    import subprocess
    import sys

    code = ("import sys, anima_adapters_lycoris.plugin; "
            "print(sorted(m for m in ('torch', 'lycoris') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
