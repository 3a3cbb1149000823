# Stand-in for feeds/packages/lang/python/python3-package.mk (OpenWrt 24.10), the parts a
# PYTHON3_PKG_BUILD:=0 package uses: Py3Package with the default filespec (+|PYTHON3_PKG_DIR),
# Python3/CompileAll (compileall -r 20 -b -d /, PYTHONHASHSEED=SOURCE_DATE_EPOCH), then
# DeleteSourceFiles for <name> and DeleteNonSourceFiles for <name>-src, DeleteEmptyDirs.
PYTHON3_PKG_DIR:=/usr/lib/python3.11/site-packages

define Py3Package
  ifdef Py3Package/$(1)/filespec
    $$(error stand-in: only the default filespec is implemented)
  endif
  define Package/$(1)/install
	$$(call Py3Package/$(1)/install,$$(1))
	$(INSTALL_DIR) $$(1)$(PYTHON3_PKG_DIR)
	$(CP) $(PKG_INSTALL_DIR)$(PYTHON3_PKG_DIR)/. $$(1)$(PYTHON3_PKG_DIR)/
	$(FIND) $$(1) -name '*.exe' -delete
	PYTHONHASHSEED=$(SOURCE_DATE_EPOCH) SOURCE_DATE_EPOCH=$(SOURCE_DATE_EPOCH) $(HOST_PYTHON3_BIN) -m compileall -q -r 20 -b -d / $$(1)
	$(FIND) $$(1) -type f -name '*.py' -delete
	$(FIND) $$(1) -mindepth 1 -empty -type d -delete
  endef
  define Package/$(1)-src/install
	$$(call Py3Package/$(1)/install,$$(1))
	$(INSTALL_DIR) $$(1)$(PYTHON3_PKG_DIR)
	$(CP) $(PKG_INSTALL_DIR)$(PYTHON3_PKG_DIR)/. $$(1)$(PYTHON3_PKG_DIR)/
	$(FIND) $$(1) -not -type d -not -name '*.py' -delete
	$(FIND) $$(1) -mindepth 1 -empty -type d -delete
  endef
endef
