"""cupy_ep.transport_env: the proxy-transport switch and the transport description (no GPU)."""
import pytest

from cupy_ep import transport_env as te
from cupy_ep.errors import CupyEpError


def _loads(name):
    assert name == te.UCX_LIBRARY


def _missing(name):
    raise OSError(f"{name}: cannot open shared object file")


@pytest.mark.parametrize("value", [None, "", "0"])
def test_switch_off_changes_nothing(value):
    env = {} if value is None else {te.SWITCH: value}
    before = dict(env)
    assert te.apply(env, load=_missing) is None
    assert env == before


def test_switch_on_sets_the_proxy_settings_and_keeps_the_users():
    env = {te.SWITCH: "1", "UCX_TLS": "tcp,self"}
    got = te.apply(env, load=_loads)
    assert got == {**te.PROXY_SETTINGS, "UCX_TLS": "tcp,self"}
    assert env["NVSHMEM_DISABLE_P2P"] == "1" and env["NVSHMEM_REMOTE_TRANSPORT"] == "ucx"
    assert env["UCX_TLS"] == "tcp,self"


def test_switch_on_without_ucx_says_what_to_install():
    with pytest.raises(CupyEpError, match=r"libucp\.so\.0 cannot be loaded.*libucx-cu13.*LD_LIBRARY_PATH"):
        te.apply({te.SWITCH: "1"}, load=_missing)


def test_bad_switch_value_is_refused():
    with pytest.raises(ValueError, match="CUPY_EP_TEST_PROXY_TRANSPORT='yes'"):
        te.apply({te.SWITCH: "yes"}, load=_loads)


def test_describe_names_the_transport():
    assert te.describe({}) == "NVSHMEM remote transport ibrc (default)"
    assert te.describe({"NVSHMEM_IB_ENABLE_IBGDA": "1"}) == "NVSHMEM remote transport ibrc (default), IBGDA on"
    assert te.describe({"NVSHMEM_REMOTE_TRANSPORT": "libfabric", "NVSHMEM_LIBFABRIC_PROVIDER": "efa"}) == \
        "NVSHMEM remote transport libfabric, provider efa"
    env = {te.SWITCH: "1"}
    te.apply(env, load=_loads)
    assert te.describe(env) == ("NVSHMEM remote transport ucx, P2P off, proxy test mode, "
                                "UCX_TLS=tcp,cuda_copy,self")
