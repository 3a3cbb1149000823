# Stand-in for an OpenWrt SDK's rules.mk (tests/test_sdk_makefiles.py): only what the feed's
# install recipes use. The real one sets far more; these values are OpenWrt's.
INSTALL_DIR:=install -d -m0755
INSTALL_BIN:=install -m0755
INSTALL_DATA:=install -m0644
INSTALL_CONF:=install -m0600
CP:=cp -fpR
FIND:=find
SED:=sed -i -e
HOST_TAR:=tar
