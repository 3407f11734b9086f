"""Storage backends. Each implements the primitives of :class:`~sealtrail.store.base.Store`."""
