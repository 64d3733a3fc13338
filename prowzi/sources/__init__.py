"""Where sources come from beyond the local corpus (:mod:`prowzi.sources.providers`)."""
