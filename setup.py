from setuptools import setup

# cffi builds keychain_ext._native against the limited C API (Py_LIMITED_API),
# so one cp39-abi3 wheel per platform serves CPython 3.9 and later.
setup(
    cffi_modules=["csrc/build_ffi.py:ffibuilder"],
    options={"bdist_wheel": {"py_limited_api": "cp39"}},
)
