//! The variables of a user's environment that change what the Go toolchain builds, shared by
//! `farm go-build` (passed into the action) and `farm go-test` (hashed into the cache keys).

/// Variables that change what `go build` / `go test -c` produce for pure-Go code.
pub const PURE_BUILD_VARS: &[&str] = &[
    "GOEXPERIMENT",
    "GOAMD64",
    "GOARM64",
    "GOPPC64",
    "GORISCV64",
    "GOMIPS64",
    "GOMIPS",
    "GO386",
];

/// More such variables once cgo is on: the C toolchain's.
pub const CGO_VARS: &[&str] = &[
    "CC",
    "CXX",
    "CGO_CFLAGS",
    "CGO_CPPFLAGS",
    "CGO_CXXFLAGS",
    "CGO_LDFLAGS",
    "PKG_CONFIG_PATH",
];
