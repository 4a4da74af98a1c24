//! collbench's command line: nccl-tests' flags and meanings, plus where
//! the buffers live and how the job is started.

use clap::{Parser, ValueEnum};

/// Time rankmesh collectives the way nccl-tests times NCCL's.
///
/// Under `rankrun -n N collbench ...` every process is one rank; with
/// `--np N` collbench starts its own seed and N ranks on this host.
#[derive(Parser, Debug, Clone)]
#[command(name = "collbench", version)]
pub struct Args {
    /// Collectives to time, comma-separated.
    #[arg(
        long = "coll",
        value_enum,
        value_delimiter = ',',
        default_value = "allreduce"
    )]
    pub colls: Vec<Coll>,
    /// Smallest size in bytes (K, M, G suffixes: powers of 1024).
    #[arg(short = 'b', long = "minbytes", default_value = "32M", value_parser = parse_size)]
    pub min_bytes: u64,
    /// Largest size in bytes.
    #[arg(short = 'e', long = "maxbytes", default_value = "32M", value_parser = parse_size)]
    pub max_bytes: u64,
    /// Multiply the size by this factor between steps.
    #[arg(short = 'f', long = "stepfactor", default_value_t = 2)]
    pub step_factor: u64,
    /// Add this many bytes between steps instead (overrides -f).
    #[arg(short = 'i', long = "stepbytes", value_parser = parse_size)]
    pub step_bytes: Option<u64>,
    /// Exactly these sizes instead of -b/-e/-f/-i, comma-separated (each
    /// with K, M or G if wanted).
    #[arg(long, value_delimiter = ',', value_parser = parse_size, value_name = "LIST")]
    pub sizes: Option<Vec<u64>>,
    /// Reduction operation.
    #[arg(short = 'o', long = "op", value_enum, default_value = "sum")]
    pub op: Op,
    /// Element type.
    #[arg(short = 'd', long = "datatype", value_enum, default_value = "float")]
    pub dtype: Dtype,
    /// Root rank of rooted collectives (broadcast, reduce, gather, scatter).
    #[arg(short = 'r', long = "root", default_value_t = 0)]
    pub root: usize,
    /// Timed iterations per size (0: chosen per size so that a batch
    /// takes about 0.2-0.5 s on this kind of machine).
    #[arg(short = 'n', long = "iters", default_value_t = 20)]
    pub iters: usize,
    /// Untimed warm-up iterations per size.
    #[arg(short = 'w', long = "warmup_iters", default_value_t = 5)]
    pub warmup: usize,
    /// Check the results (1) or not (0): wrong elements are counted in
    /// `#wrong` and make collbench exit with status 1.
    #[arg(short = 'c', long = "check", default_value_t = 1)]
    pub check: u8,
    /// Repeat the timed iterations this many times and report the median.
    #[arg(long, default_value_t = 1)]
    pub batches: usize,
    /// Start a seed and this many ranks on this host (instead of running
    /// under rankrun).
    #[arg(long)]
    pub np: Option<usize>,
    /// Where the buffers live: host memory, or a GPU through rankmesh's
    /// wgpu or CUDA backend (collbench built with the feature of that name).
    #[arg(long, value_enum, default_value = "host")]
    pub device: DeviceKind,
    /// Device staging chunk in bytes (default: the backend's).
    #[arg(long, value_parser = parse_size, value_name = "BYTES")]
    pub chunk: Option<u64>,
    /// Device staging chunks in flight (default: the backend's).
    #[arg(long, value_name = "N")]
    pub ring: Option<usize>,
    /// Run each rank on tokio's multi-threaded runtime instead of a
    /// current-thread one (the rank's code stays on the main thread).
    #[arg(long)]
    pub multi_thread: bool,
    /// With --multi-thread: run the rank's code in a task on the
    /// runtime's worker threads.
    #[arg(long, requires = "multi_thread")]
    pub spawn: bool,
    /// Draw bus bandwidth against size (log axes, one line per
    /// collective) into this SVG file.
    #[arg(long, value_name = "FILE.svg")]
    pub plot: Option<String>,
    /// Also write each row as a JSON object on its own line to this file
    /// (`-`: standard output, instead of the table).
    #[arg(long, value_name = "FILE")]
    pub json: Option<String>,
}

/// The collectives collbench times.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Coll {
    Allreduce,
    Broadcast,
    Reduce,
    Allgather,
    Reducescatter,
    Alltoall,
    Gather,
    Scatter,
    Barrier,
    Sendrecv,
    /// Ranks 0 and 1 only: a message there and back; the time is one way
    /// (half the round trip), as OSU's latency test reports it.
    Pingpong,
}

impl Coll {
    pub fn name(self) -> &'static str {
        match self {
            Coll::Allreduce => "allreduce",
            Coll::Broadcast => "broadcast",
            Coll::Reduce => "reduce",
            Coll::Allgather => "allgather",
            Coll::Reducescatter => "reducescatter",
            Coll::Alltoall => "alltoall",
            Coll::Gather => "gather",
            Coll::Scatter => "scatter",
            Coll::Barrier => "barrier",
            Coll::Sendrecv => "sendrecv",
            Coll::Pingpong => "pingpong",
        }
    }

    /// nccl-tests' bus bandwidth factor for `p` ranks: what each rank's
    /// link carries relative to the algorithm bandwidth.
    pub fn bus_factor(self, p: usize) -> f64 {
        let p = p as f64;
        match self {
            Coll::Allreduce => 2.0 * (p - 1.0) / p,
            Coll::Allgather | Coll::Reducescatter | Coll::Alltoall => (p - 1.0) / p,
            Coll::Gather | Coll::Scatter => (p - 1.0) / p,
            Coll::Broadcast | Coll::Reduce | Coll::Sendrecv | Coll::Pingpong | Coll::Barrier => 1.0,
        }
    }

    pub fn reduces(self) -> bool {
        matches!(self, Coll::Allreduce | Coll::Reduce | Coll::Reducescatter)
    }

    pub fn rooted(self) -> bool {
        matches!(
            self,
            Coll::Broadcast | Coll::Reduce | Coll::Gather | Coll::Scatter
        )
    }

    /// Whether the size is split into one block per rank (so it must
    /// hold at least one element per rank).
    pub fn blocked(self) -> bool {
        matches!(
            self,
            Coll::Allgather | Coll::Reducescatter | Coll::Alltoall | Coll::Gather | Coll::Scatter
        )
    }
}

/// Where the buffers live.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceKind {
    Host,
    Wgpu,
    Cuda,
}

/// Reduction operations, by nccl-tests' names.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Sum,
    Prod,
    Min,
    Max,
}

impl Op {
    pub fn reduce_op(self) -> rankmesh::ReduceOp {
        match self {
            Op::Sum => rankmesh::ReduceOp::Sum,
            Op::Prod => rankmesh::ReduceOp::Prod,
            Op::Min => rankmesh::ReduceOp::Min,
            Op::Max => rankmesh::ReduceOp::Max,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Op::Sum => "sum",
            Op::Prod => "prod",
            Op::Min => "min",
            Op::Max => "max",
        }
    }
}

/// Element types, by nccl-tests' names.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dtype {
    Int8,
    Uint8,
    Int32,
    Uint32,
    Int64,
    Uint64,
    Half,
    Float,
    Double,
    Bfloat16,
}

impl Dtype {
    pub fn name(self) -> &'static str {
        match self {
            Dtype::Int8 => "int8",
            Dtype::Uint8 => "uint8",
            Dtype::Int32 => "int32",
            Dtype::Uint32 => "uint32",
            Dtype::Int64 => "int64",
            Dtype::Uint64 => "uint64",
            Dtype::Half => "half",
            Dtype::Float => "float",
            Dtype::Double => "double",
            Dtype::Bfloat16 => "bfloat16",
        }
    }
}

impl Dtype {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Dtype::Int8 | Dtype::Uint8 => 1,
            Dtype::Half | Dtype::Bfloat16 => 2,
            Dtype::Int32 | Dtype::Uint32 | Dtype::Float => 4,
            Dtype::Int64 | Dtype::Uint64 | Dtype::Double => 8,
        }
    }
}

/// A byte count with an optional K, M or G suffix (powers of 1024).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, mult) = match t.char_indices().last() {
        Some((i, 'K' | 'k')) => (&t[..i], 1u64 << 10),
        Some((i, 'M' | 'm')) => (&t[..i], 1 << 20),
        Some((i, 'G' | 'g')) => (&t[..i], 1 << 30),
        _ => (t, 1),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size (a number of bytes, or with K, M or G)"))?;
    n.checked_mul(mult)
        .ok_or_else(|| format!("{s:?} is too large"))
}

impl Args {
    /// Check what clap cannot: size ranges, the root against the world.
    pub fn validate(&self) -> Result<(), String> {
        if self.min_bytes > self.max_bytes {
            return Err(format!(
                "-b {} is larger than -e {}",
                self.min_bytes, self.max_bytes
            ));
        }
        if self.step_bytes == Some(0) || (self.step_bytes.is_none() && self.step_factor < 2) {
            return Err("-f must be at least 2 (or -i at least 1)".into());
        }
        if self.batches == 0 {
            return Err("--batches must be at least 1".into());
        }
        if let Some(m) = crate::device::missing(self.device) {
            return Err(m);
        }
        if let Some(m) = self
            .colls
            .iter()
            .find_map(|&c| crate::device::unsupported(self.device, c))
        {
            return Err(m);
        }
        if let Some(m) = crate::device::no_dtype(self.device, self.dtype) {
            return Err(m);
        }
        if self.ring == Some(0) || self.chunk == Some(0) {
            return Err("--ring and --chunk must be at least 1".into());
        }
        if let Some(p) = &self.plot {
            if !p.ends_with(".svg") {
                return Err(format!(
                    "--plot {p}: the plot is an SVG file; name it FILE.svg"
                ));
            }
        }
        if self.np == Some(0) {
            return Err("--np must be at least 1".into());
        }
        if let Some(np) = self.np {
            if self.root >= np && self.colls.iter().any(|c| c.rooted()) {
                return Err(format!(
                    "-r {}: --np {np} gives ranks 0 to {}",
                    self.root,
                    np - 1
                ));
            }
        }
        if self.check > 1 {
            return Err("-c takes 0 or 1".into());
        }
        Ok(())
    }

    /// Timed iterations for `bytes`: -n, or with -n 0 a count that keeps a
    /// batch near 0.2-0.5 s.
    pub fn iters_for(&self, bytes: u64) -> usize {
        match (self.iters, bytes) {
            (0, 0..=4096) => 500,
            (0, 4097..=1_048_576) => 50,
            (0, 1_048_577..=16_777_216) => 6,
            (0, _) => 2,
            (n, _) => n,
        }
    }

    /// The sizes to time, in bytes, from -b to -e.
    pub fn sizes(&self) -> Vec<u64> {
        if let Some(list) = &self.sizes {
            return list.clone();
        }
        let mut out = Vec::new();
        let mut s = self.min_bytes;
        loop {
            out.push(s);
            let next = match self.step_bytes {
                Some(i) => s.saturating_add(i),
                None => s.max(1).saturating_mul(self.step_factor),
            };
            if next > self.max_bytes || next == s {
                return out;
            }
            s = next;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_take_suffixes_and_step_like_nccl_tests() {
        assert_eq!(parse_size("8"), Ok(8));
        assert_eq!(parse_size("128M"), Ok(128 << 20));
        assert_eq!(parse_size("1g"), Ok(1 << 30));
        assert!(parse_size("12Q").is_err() && parse_size("").is_err());
        let a = Args::try_parse_from(["collbench", "-b", "8", "-e", "128", "-f", "4"]).unwrap();
        assert_eq!(a.sizes(), vec![8, 32, 128]);
        let a = Args::try_parse_from(["collbench", "-b", "1K", "-e", "4K", "-i", "1K"]).unwrap();
        assert_eq!(a.sizes(), vec![1024, 2048, 3072, 4096]);
        let a = Args::try_parse_from(["collbench", "-b", "0", "-e", "4"]).unwrap();
        assert_eq!(a.sizes(), vec![0, 2, 4]);
        let a = Args::try_parse_from(["collbench", "--sizes", "4,64K,1M"]).unwrap();
        assert_eq!(a.sizes(), vec![4, 65536, 1 << 20]);
    }

    #[test]
    fn nccl_tests_flags_parse() {
        let a = Args::try_parse_from([
            "collbench",
            "--coll",
            "allreduce,alltoall,sendrecv",
            "-o",
            "max",
            "-d",
            "bfloat16",
            "-r",
            "1",
            "-n",
            "3",
            "-w",
            "0",
            "-c",
            "0",
        ])
        .unwrap();
        assert_eq!(
            a.colls,
            vec![Coll::Allreduce, Coll::Alltoall, Coll::Sendrecv]
        );
        assert_eq!((a.op, a.dtype, a.root), (Op::Max, Dtype::Bfloat16, 1));
        assert_eq!((a.iters, a.warmup, a.check), (3, 0, 0));
        assert!(a.validate().is_ok());
        let bad = Args::try_parse_from(["collbench", "-b", "2M", "-e", "1M"]).unwrap();
        assert!(bad.validate().unwrap_err().contains("-b"));
        assert!(Args::try_parse_from(["collbench", "--coll", "allreduse"]).is_err());
    }

    #[test]
    fn bus_factors_are_nccl_tests_ones() {
        assert_eq!(Coll::Allreduce.bus_factor(4), 1.5);
        assert_eq!(Coll::Allgather.bus_factor(4), 0.75);
        assert_eq!(Coll::Broadcast.bus_factor(4), 1.0);
    }
}
