"""Deployment across sites: ``deploy init`` material (CA, certificates, site keys and node configs;
``config_text`` checks what goes into them, ``tree`` swaps a rebuilt folder in all at once), site registration and listing through the
deployment's own connection (``sites``), the site preflight check and a loopback federation used
by tests and benchmarks.

Shell scripts (``start-superlink.sh``, ``start-site.sh``, ``register-sites.sh``), Dockerfiles and
``compose.yaml`` live beside this package; ``README.md`` here explains how they fit together.
"""
