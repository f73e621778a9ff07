"""Pure parsing of a CNI invocation: environment, CNI_ARGS, network config."""
import ipaddress

import pytest

from runtime import errors
from runtime.cni.request import parse_cni_args, parse_request
from runtime.core.netconf import parse_netconf
from runtime.errors import SockgateError

CONF = b'{"cniVersion": "1.1.0", "name": "n", "type": "sockgate"}'
ENV = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "abc", "CNI_NETNS": "/run/netns/x", "CNI_IFNAME": "eth0"}


def code_of(fn, *args) -> int:
    with pytest.raises(SockgateError) as info:
        fn(*args)
    return info.value.code


def test_cni_args_keeps_pod_identity_and_drops_ignore_unknown():
    args = parse_cni_args("IgnoreUnknown=1;K8S_POD_NAMESPACE=ns;K8S_POD_NAME=web-0;"
                          "K8S_POD_UID=u-1;FOO=bar")
    assert args == {"K8S_POD_NAMESPACE": "ns", "K8S_POD_NAME": "web-0", "K8S_POD_UID": "u-1"}


def test_cni_args_unknown_key_without_ignore_unknown_is_an_error():
    with pytest.raises(SockgateError) as info:
        parse_cni_args("FOO=bar")
    assert info.value.code == errors.INVALID_ENV and "FOO" in info.value.details


def test_cni_args_malformed():
    assert code_of(parse_cni_args, "K8S_POD_NAME") == errors.INVALID_ENV


@pytest.mark.parametrize("missing", ["CNI_COMMAND", "CNI_CONTAINERID", "CNI_IFNAME", "CNI_NETNS"])
def test_missing_env_is_code_4(missing):
    env = {k: v for k, v in ENV.items() if k != missing}
    with pytest.raises(SockgateError) as info:
        parse_request(env, CONF)
    assert info.value.code == errors.INVALID_ENV and missing in info.value.msg


def test_del_accepts_empty_netns():
    req = parse_request(dict(ENV, CNI_COMMAND="DEL", CNI_NETNS=""), CONF)
    assert req.command == "DEL" and req.netns == ""


@pytest.mark.parametrize("stdin,code", [
    (b"{not json", errors.DECODE_FAILURE),
    (b"[1, 2]", errors.DECODE_FAILURE),
    (b'{"cniVersion": "0.2.0", "name": "n", "type": "sockgate"}', errors.INCOMPATIBLE_VERSION),
    (b'{"name": "n", "type": "sockgate"}', errors.INVALID_CONFIG),
])
def test_bad_stdin(stdin, code):
    assert code_of(parse_request, ENV, stdin) == code


@pytest.mark.parametrize("ifname", ["a" * 16, "eth/0", "eth 0", "..", "eth:0"])
def test_bad_ifname(ifname):
    assert code_of(parse_request, dict(ENV, CNI_IFNAME=ifname), CONF) == errors.INVALID_ENV


def test_bad_container_id():
    assert code_of(parse_request, dict(ENV, CNI_CONTAINERID="../etc"), CONF) == errors.INVALID_ENV


def test_unknown_command():
    assert code_of(parse_request, dict(ENV, CNI_COMMAND="FROB"), CONF) == errors.INVALID_ENV


def test_version_needs_no_container():
    assert parse_request({"CNI_COMMAND": "VERSION"}, b'{"cniVersion": "0.4.0"}').command == "VERSION"


def test_netconf_defaults():
    conf = parse_netconf({"cniVersion": "1.0.0", "name": "n", "type": "sockgate"})
    assert conf.ipv4_pool == ipaddress.ip_network("10.77.0.0/16")
    assert conf.ipv6_pool.version == 6 and conf.ipv6_pool.network_address.packed[0] == 0xfd
    assert "8.8.8.8" in conf.dns.nameservers and "2001:4860:4860::8888" in conf.dns.nameservers
    assert conf.mtu == 1500


@pytest.mark.parametrize("field,value,code", [
    ("mtu", "1500", errors.INVALID_CONFIG),
    ("mtu", True, errors.INVALID_CONFIG),
    ("mtu", 100, errors.INVALID_CONFIG),
    ("ipv4Pool", 42, errors.INVALID_CONFIG),
    ("ipv4Pool", "10.0.0.1/8", errors.INVALID_CONFIG),
    ("ipv4Pool", "fd00::/64", errors.INVALID_CONFIG),
    ("ipv6Pool", "10.0.0.0/8", errors.INVALID_CONFIG),
    ("dns", {"nameservers": ["not-an-ip"]}, errors.INVALID_CONFIG),
    ("dns", "8.8.8.8", errors.INVALID_CONFIG),
    ("name", "bad/name", errors.INVALID_CONFIG),
    ("ipam", {"type": "host-local"}, errors.UNSUPPORTED_FIELD),
    ("frobnicate", 1, errors.UNSUPPORTED_FIELD),
])
def test_netconf_errors_name_the_field(field, value, code):
    conf = {"cniVersion": "1.1.0", "name": "n", "type": "sockgate", field: value}
    with pytest.raises(SockgateError) as info:
        parse_netconf(conf)
    assert info.value.code == code
    assert field.split(".")[0] in info.value.msg


def test_wire_round_trip_and_run_dir_without_json():
    from runtime import wire
    env = {"CNI_COMMAND": "ADD", "CNI_ARGS": "A=b;C=d", "PATH": "/bin"}
    stdin = b'{"cniVersion": "1.1.0", "runDir": "/tmp/x y", "name": "n"}'
    got_env, got_stdin = wire.decode_request(wire.encode_request(env, stdin))
    assert got_env == {"CNI_COMMAND": "ADD", "CNI_ARGS": "A=b;C=d"} and got_stdin == stdin
    assert wire.decode_reply(wire.encode_reply(3, '{"code": 3}')) == (3, '{"code": 3}')
    assert wire.top_level_string(stdin, "runDir") == "/tmp/x y"
    assert wire.top_level_string(b'{"runDir": "a\\\\b"}', "runDir") is None  # escapes: parse properly
    assert wire.top_level_string(b'{"name": "x"}', "runDir") is None
    with pytest.raises(ValueError):
        wire.decode_request(b"GET / HTTP/1.0\r\n\r\n")
