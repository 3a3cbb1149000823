# Read after a feed Makefile: `prepare` runs its Build/Prepare, `build` its Build/Install,
# `install-NAME` its Package/NAME/install into $(IDIR)/NAME, `script-WHAT` writes
# Package/$(PKG_NAME)/WHAT (postinst, prerm) to $(IDIR)/WHAT ($(file) ends it with a newline,
# as package-pack.mk's echo does),
# `depends-NAME` prints the package's DEPENDS.
.PHONY: prepare build
prepare:
	$(call Build/Prepare)
build:
	$(call Build/Install)
install-%:
	rm -rf $(IDIR)/$*
	mkdir -p $(IDIR)/$*
	$(call Package/$*/install,$(IDIR)/$*)
script-%:
	$(file >$(IDIR)/$*,$(Package/$(PKG_NAME)/$*))
depends-%:
	$(eval $(Package/$*))@echo '$(strip $(DEPENDS) $(LUCI_DEPENDS))'
