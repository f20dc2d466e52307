"""Stage 2, native: the kernel's own KHO code as a userspace library.

- ``extract``: the tree's ``kexec_handover.c``, preprocessed against the
  shims (``c/shims``), reduced to what the driver reaches, unchanged
  otherwise;
- ``build``: extracted unit + driver (``c/driver``) + runtime
  (``c/runtime``) + the tree's libfdt -> a cached shared library per
  (source, page shift, flavor);
- ``contract``: the one definition of what C and Python exchange (the C
  header is generated from it);
- ``binding``: the FFI (``NativeKernel``): one call per program, records
  turned into an ``Outcome``;
- ``sanitizer``: the ASan/UBSan runtimes the sanitizer flavors need.
"""
