"""The OpenWrt root the `owrt` tests stand on: OpenWrt's own ubusd, rpcd and uhttpd, built from
source, answer as on a router (real sessions, real ACLs), at a router's paths."""

from __future__ import annotations

import pytest

from tests.support.owrt import Login, OwrtRoot, UbusHttp, UbusHttpError

pytestmark = pytest.mark.owrt


def test_daemons_run_at_openwrt_paths_with_real_sessions_and_acls(tmp_path, free_port):
    with OwrtRoot(tmp_path / "root") as root:
        # OpenWrt's shell library and busybox ash at their paths
        shell = root.run(["sh", "-c", ". /lib/functions.sh; echo $(readlink /bin/sh) $(type config_load | head -1)"],
                         text=True)
        assert shell.stdout.split()[:2] == ["/usr/bin/busybox", "config_load"], shell
        root.start_ubusd()
        root.start_rpcd([Login("root", "admin-pw"), Login("viewer", "view-pw", read=("luci-base",), write=())])
        root.start_uhttpd(free_port)
        objects = root.ubus("list").stdout.split()
        assert {"session", "uci", "file", "luci"} <= set(objects), objects

        http = UbusHttp(f"http://127.0.0.1:{free_port}")
        with pytest.raises(UbusHttpError):
            http.call("uci", "get", config="luci")  # anonymous: no access
        with pytest.raises(UbusHttpError):
            UbusHttp(http.url[:-5]).login("root", "wrong")
        http.login("root", "admin-pw")
        status, reply = http.call("uci", "get", config="luci", section="main")
        assert status == 0 and reply["values"][".type"] == "core"

        # a read-only login: uhttpd lets `uci get` through (ubus ACL) and rpcd's uci object
        # refuses the config it may not read (uci ACL, status 6); `uci set` never gets through
        viewer = UbusHttp(http.url[:-5]).login("viewer", "view-pw")
        status, _ = viewer.call("uci", "get", config="luci", section="main")
        assert status == 6
        with pytest.raises(UbusHttpError) as denied:
            viewer.call("uci", "set", config="luci", section="main", values={"lang": "de"})
        assert "denied" in str(denied.value).lower()
