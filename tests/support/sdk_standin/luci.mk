# Stand-in for feeds/luci/luci.mk: its Package/<name>/install copies $(PKG_BUILD_DIR)/htdocs to
# /www and $(PKG_BUILD_DIR)/root to / (cp -pR), which is all luci-app-bitmesh has.
PKG_NAME?=$(notdir $(CURDIR))
LUCI_NAME:=$(PKG_NAME)
define Package/$(PKG_NAME)/install
	if [ -d $(PKG_BUILD_DIR)/htdocs ]; then $(INSTALL_DIR) $(1)/www; cp -pR $(PKG_BUILD_DIR)/htdocs/* $(1)/www/; fi
	if [ -d $(PKG_BUILD_DIR)/root ]; then $(INSTALL_DIR) $(1)/; cp -pR $(PKG_BUILD_DIR)/root/* $(1)/; fi
endef
BUILT_PACKAGES += $(PKG_NAME)
