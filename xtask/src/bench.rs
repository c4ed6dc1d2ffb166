//! placeholder
pub struct BenchOptions;
impl BenchOptions { pub fn new(_q: bool, _r: Option<usize>, _m: Option<u64>) -> Self { todo!() } }
pub fn run(_o: BenchOptions) -> anyhow::Result<()> { todo!() }
