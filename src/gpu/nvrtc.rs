//! Finding and calling NVRTC, CUDA's runtime compiler, for the CUDA backend.
//!
//! cudarc looks for NVRTC only under the names `libnvrtc.so` and
//! `libnvrtc.so.{12,11,10,9,1}`. Machines with only a runtime package or a
//! pip wheel have neither: CUDA 13 installs `libnvrtc.so.13`, the pip wheels
//! put `libnvrtc.so.12` or `.13` inside `site-packages/nvidia/...`, where no
//! loader looks. So rankmesh searches itself ([`candidates`]), loads the
//! library with `libloading`, compiles the kernels to PTX and hands cudarc
//! only the PTX (which the driver loads with `cuModuleLoadData`).
//!
//! Order of the search: `RANKMESH_NVRTC` (a path), the loader's own search
//! (`LD_LIBRARY_PATH`, the ldconfig cache) under the versioned and
//! unversioned names, then the CUDA installations (`CUDA_HOME`,
//! `CUDA_PATH`, `/usr/local/cuda*`) and the Python environments (an active
//! virtualenv or conda environment, `~/.local`, `/usr/local`, `/usr`) that
//! pip's `nvidia-cuda-nvrtc` wheels install into. An NVRTC newer than the
//! driver emits PTX the driver cannot load, so [`Cuda::new`] tries the
//! candidates in order until one compiles kernels the driver accepts.
//!
//! [`Cuda::new`]: super::Cuda::new

use std::ffi::{c_char, c_int, CStr, CString};
use std::path::{Path, PathBuf};

/// The library names the dynamic loader is asked for, newest first.
const NAMES: [&str; 6] = [
    "libnvrtc.so.13",
    "libnvrtc.so.12",
    "libnvrtc.so",
    "libnvrtc.so.11.2",
    "libnvrtc.so.11",
    "libnvrtc.so.1",
];

/// Where to look up environment variables (tests pass their own).
pub(crate) type Lookup<'a> = &'a dyn Fn(&str) -> Option<String>;

/// Every NVRTC library to try, in order: explicit paths and bare names (for
/// the dynamic loader's own search), without duplicates.
pub(crate) fn candidates(env: Lookup<'_>) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = Vec::new();
    if let Some(p) = env("RANKMESH_NVRTC").filter(|p| !p.is_empty()) {
        out.push(PathBuf::from(p));
    }
    out.extend(NAMES.iter().map(PathBuf::from));
    for dir in search_dirs(env) {
        out.extend(libraries_in(&dir));
    }
    let mut seen = std::collections::HashSet::new();
    out.retain(|p| seen.insert(p.clone()));
    out
}

/// Directories that hold NVRTC in CUDA installations and pip wheels.
fn search_dirs(env: Lookup<'_>) -> Vec<PathBuf> {
    let mut roots: Vec<PathBuf> = Vec::new();
    for var in ["CUDA_HOME", "CUDA_PATH", "CUDA_ROOT"] {
        if let Some(v) = env(var).filter(|v| !v.is_empty()) {
            roots.push(PathBuf::from(v));
        }
    }
    roots.push(PathBuf::from("/usr/local/cuda"));
    // /usr/local/cuda-13.0, cuda-12.8, ...: newest first.
    let mut versioned = subdirs(Path::new("/usr/local"), |n| n.starts_with("cuda-"));
    versioned.sort_by_key(|p| std::cmp::Reverse(version_key(p)));
    roots.extend(versioned);
    let mut dirs: Vec<PathBuf> = Vec::new();
    for r in &roots {
        dirs.push(r.join("lib64"));
        dirs.push(r.join("lib"));
        dirs.push(r.join("targets/x86_64-linux/lib"));
        dirs.push(r.join("targets/sbsa-linux/lib"));
    }
    // Python environments: site-packages/nvidia/{cu13,cu12,cuda_nvrtc}/lib.
    let mut prefixes: Vec<PathBuf> = Vec::new();
    for var in ["VIRTUAL_ENV", "CONDA_PREFIX"] {
        if let Some(v) = env(var).filter(|v| !v.is_empty()) {
            prefixes.push(PathBuf::from(&v));
            dirs.push(PathBuf::from(v).join("lib"));
        }
    }
    if let Some(home) = env("HOME").filter(|v| !v.is_empty()) {
        prefixes.push(PathBuf::from(home).join(".local"));
    }
    prefixes.push(PathBuf::from("/usr/local"));
    prefixes.push(PathBuf::from("/usr"));
    for p in prefixes {
        let mut pys = subdirs(&p.join("lib"), |n| n.starts_with("python3"));
        pys.sort_by_key(|p| std::cmp::Reverse(version_key(p)));
        for py in pys {
            for site in ["site-packages", "dist-packages"] {
                let nv = py.join(site).join("nvidia");
                for sub in ["cu13", "cu12", "cuda_nvrtc"] {
                    dirs.push(nv.join(sub).join("lib"));
                }
            }
        }
    }
    dirs
}

/// Subdirectories of `dir` whose names pass `keep`.
fn subdirs(dir: &Path, keep: impl Fn(&str) -> bool) -> Vec<PathBuf> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    rd.filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_str().is_some_and(&keep))
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .collect()
}

/// The numbers in a path's last component ("cuda-12.8" -> [12, 8];
/// "libnvrtc.so.13.0.88" -> [13, 0, 88]), to order versions.
fn version_key(p: &Path) -> Vec<u64> {
    let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
    name.split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .filter_map(|s| s.parse().ok())
        .collect()
}

/// The NVRTC libraries in `dir` (`libnvrtc.so*`, not the builtins or
/// static archives), highest version first.
fn libraries_in(dir: &Path) -> Vec<PathBuf> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut libs: Vec<PathBuf> = rd
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n == "libnvrtc.so" || n.starts_with("libnvrtc.so."))
        })
        .collect();
    libs.sort_by_key(|p| std::cmp::Reverse(version_key(p)));
    libs
}

type NvrtcResult = c_int;
type Program = *mut std::ffi::c_void;

/// A loaded NVRTC library. Kept for the life of the process once it has
/// compiled the kernels (see `cuda_backend`), never unloaded.
pub(crate) struct Nvrtc {
    lib: libloading::Library,
    /// Where it was found, for messages.
    pub(crate) path: PathBuf,
    /// `(major, minor)` as NVRTC reports it.
    pub(crate) version: (i32, i32),
}

/// Why NVRTC could not be loaded, or could not compile (with its log).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct NvrtcError(String);

impl std::fmt::Display for NvrtcError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl Nvrtc {
    /// Load the library at `path` (a path or a bare name for the dynamic
    /// loader) and ask its version.
    pub(crate) fn open(path: &Path) -> Result<Nvrtc, NvrtcError> {
        // SAFETY: loading NVRTC runs its initialisers, which only set up
        // the library itself; it is a plain C library with no init-order
        // requirements.
        let lib = unsafe { libloading::Library::new(path.as_os_str()) }
            .map_err(|e| NvrtcError(format!("{}: {e}", path.display())))?;
        let mut n = Nvrtc {
            lib,
            path: path.to_path_buf(),
            version: (0, 0),
        };
        let (mut major, mut minor) = (0, 0);
        // SAFETY: nvrtcVersion(int*, int*) writes two ints.
        let r = unsafe {
            let f = n.sym::<unsafe extern "C" fn(*mut c_int, *mut c_int) -> NvrtcResult>(
                b"nvrtcVersion\0",
            )?;
            f(&mut major, &mut minor)
        };
        if r != 0 {
            return Err(NvrtcError(format!(
                "{}: nvrtcVersion failed ({r})",
                path.display()
            )));
        }
        n.version = (major, minor);
        Ok(n)
    }

    /// # Safety
    /// `T` must be the C signature of the symbol `name`.
    unsafe fn sym<T: Copy>(&self, name: &[u8]) -> Result<T, NvrtcError> {
        // SAFETY: the caller names the symbol's true type.
        unsafe { self.lib.get::<T>(name) }.map(|s| *s).map_err(|e| {
            NvrtcError(format!(
                "{}: no symbol {}: {e}",
                self.path.display(),
                String::from_utf8_lossy(name)
            ))
        })
    }

    /// The message NVRTC gives for a result code.
    fn error_string(&self, r: NvrtcResult) -> String {
        // SAFETY: nvrtcGetErrorString(int) returns a static C string (or
        // null for an unknown code).
        unsafe {
            match self
                .sym::<unsafe extern "C" fn(NvrtcResult) -> *const c_char>(b"nvrtcGetErrorString\0")
            {
                Ok(f) => {
                    let p = f(r);
                    if p.is_null() {
                        format!("NVRTC error {r}")
                    } else {
                        CStr::from_ptr(p).to_string_lossy().into_owned()
                    }
                }
                Err(_) => format!("NVRTC error {r}"),
            }
        }
    }

    /// Compile CUDA C `src` to PTX (for NVRTC's default architecture, which
    /// every newer GPU's driver compiles further). A compile error carries
    /// NVRTC's log.
    pub(crate) fn compile(&self, src: &str) -> Result<String, NvrtcError> {
        type Create = unsafe extern "C" fn(
            *mut Program,
            *const c_char,
            *const c_char,
            c_int,
            *const *const c_char,
            *const *const c_char,
        ) -> NvrtcResult;
        type Compile = unsafe extern "C" fn(Program, c_int, *const *const c_char) -> NvrtcResult;
        type Size = unsafe extern "C" fn(Program, *mut usize) -> NvrtcResult;
        type Get = unsafe extern "C" fn(Program, *mut c_char) -> NvrtcResult;
        type Destroy = unsafe extern "C" fn(*mut Program) -> NvrtcResult;
        let src = CString::new(src).map_err(|e| NvrtcError(format!("kernel source: {e}")))?;
        let name = c"rankmesh_kernels.cu";
        // SAFETY: each symbol is declared with NVRTC's C signature; every
        // pointer passed lives until the call returns; buffers handed to
        // the getters are sized by the matching size query; the program is
        // destroyed on every path after its creation succeeded.
        unsafe {
            let create = self.sym::<Create>(b"nvrtcCreateProgram\0")?;
            let compile = self.sym::<Compile>(b"nvrtcCompileProgram\0")?;
            let ptx_size = self.sym::<Size>(b"nvrtcGetPTXSize\0")?;
            let get_ptx = self.sym::<Get>(b"nvrtcGetPTX\0")?;
            let log_size = self.sym::<Size>(b"nvrtcGetProgramLogSize\0")?;
            let get_log = self.sym::<Get>(b"nvrtcGetProgramLog\0")?;
            let destroy = self.sym::<Destroy>(b"nvrtcDestroyProgram\0")?;
            let mut prog: Program = std::ptr::null_mut();
            let r = create(
                &mut prog,
                src.as_ptr(),
                name.as_ptr(),
                0,
                std::ptr::null(),
                std::ptr::null(),
            );
            if r != 0 {
                return Err(NvrtcError(format!(
                    "nvrtcCreateProgram: {}",
                    self.error_string(r)
                )));
            }
            let read = |size: Size, get: Get| -> Result<String, NvrtcResult> {
                let mut n = 0usize;
                let r = size(prog, &mut n);
                if r != 0 {
                    return Err(r);
                }
                let mut buf = vec![0u8; n.max(1)];
                let r = get(prog, buf.as_mut_ptr().cast());
                if r != 0 {
                    return Err(r);
                }
                let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
                buf.truncate(end);
                Ok(String::from_utf8_lossy(&buf).into_owned())
            };
            let r = compile(prog, 0, std::ptr::null());
            let out = if r != 0 {
                let log = read(log_size, get_log).unwrap_or_default();
                Err(NvrtcError(format!(
                    "nvrtcCompileProgram: {}: {}",
                    self.error_string(r),
                    log.trim()
                )))
            } else {
                read(ptx_size, get_ptx)
                    .map_err(|r| NvrtcError(format!("nvrtcGetPTX: {}", self.error_string(r))))
            };
            destroy(&mut prog);
            out
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn touch(p: &Path) {
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, b"").unwrap();
    }

    /// A CUDA 13 runtime-only install and the pip wheels, with no
    /// unversioned `libnvrtc.so` anywhere: each is found.
    #[test]
    fn versioned_names_in_cuda_installs_and_pip_wheels_are_found() {
        let root = std::env::temp_dir().join(format!("rankmesh-nvrtc-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let cuda = root.join("cuda-13.0");
        let venv = root.join("venv");
        let conda = root.join("conda");
        touch(&cuda.join("lib64/libnvrtc.so.13"));
        touch(&cuda.join("lib64/libnvrtc-builtins.so.13.0"));
        touch(&cuda.join("lib64/libnvrtc_static.a"));
        touch(&venv.join("lib/python3.12/site-packages/nvidia/cu13/lib/libnvrtc.so.13"));
        touch(&conda.join("lib/python3.11/site-packages/nvidia/cuda_nvrtc/lib/libnvrtc.so.12"));
        touch(&conda.join("lib/python3.11/site-packages/nvidia/cuda_nvrtc/lib/libnvrtc.so.11.2"));
        let env: HashMap<&str, String> = [
            ("CUDA_HOME", cuda.display().to_string()),
            ("VIRTUAL_ENV", venv.display().to_string()),
            ("CONDA_PREFIX", conda.display().to_string()),
            ("RANKMESH_NVRTC", "/opt/nvrtc/libnvrtc.so.13.1".to_string()),
        ]
        .into_iter()
        .collect();
        let got = candidates(&|k| env.get(k).cloned());
        let pos = |p: PathBuf| {
            got.iter()
                .position(|g| *g == p)
                .unwrap_or_else(|| panic!("{} not among {got:?}", p.display()))
        };
        assert_eq!(
            pos("/opt/nvrtc/libnvrtc.so.13.1".into()),
            0,
            "the override comes first"
        );
        let bare = pos("libnvrtc.so.13".into());
        let install = pos(cuda.join("lib64/libnvrtc.so.13"));
        let wheel13 = pos(venv.join("lib/python3.12/site-packages/nvidia/cu13/lib/libnvrtc.so.13"));
        let wheel12 =
            pos(conda.join("lib/python3.11/site-packages/nvidia/cuda_nvrtc/lib/libnvrtc.so.12"));
        let wheel112 =
            pos(conda.join("lib/python3.11/site-packages/nvidia/cuda_nvrtc/lib/libnvrtc.so.11.2"));
        assert!(bare < install && install < wheel13, "{got:?}");
        assert!(
            wheel12 < wheel112,
            "newer first within a directory: {got:?}"
        );
        assert!(
            !got.iter()
                .any(|p| p.to_string_lossy().contains("builtins")
                    || p.to_string_lossy().ends_with(".a")),
            "{got:?}"
        );
        let mut uniq = got.clone();
        uniq.sort();
        uniq.dedup();
        assert_eq!(uniq.len(), got.len(), "no duplicates: {got:?}");
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn versions_order_numerically() {
        let mut v = [
            PathBuf::from("libnvrtc.so.9"),
            PathBuf::from("libnvrtc.so.13"),
            PathBuf::from("libnvrtc.so.12.8.93"),
        ];
        v.sort_by_key(|p| std::cmp::Reverse(version_key(p)));
        assert_eq!(v[0], PathBuf::from("libnvrtc.so.13"));
        assert_eq!(v[2], PathBuf::from("libnvrtc.so.9"));
    }

    #[test]
    fn a_missing_library_is_an_error_naming_it() {
        let e = Nvrtc::open(Path::new("/nonexistent/libnvrtc.so.99"))
            .err()
            .unwrap();
        assert!(e.to_string().contains("/nonexistent/libnvrtc.so.99"), "{e}");
    }
}
