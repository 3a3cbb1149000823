# Stand-in for $(INCLUDE_DIR)/package.mk: BuildPackage only records the package; targets.mk runs
# Build/Install and Package/<name>/install as package.mk and package-pack.mk would.
PKG_INSTALL_DIR ?= $(PKG_BUILD_DIR)/ipkg-install
Build/Prepare/Default:=
define BuildPackage
  BUILT_PACKAGES += $(1)
endef
