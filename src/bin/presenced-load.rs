//! `presenced-load`: the load generator (see `presenced-load --help` and README "Load testing").

use std::process::ExitCode;

use presenced::load::{self, Invocation, LoadError, Sched};

/// jemalloc, as in the node (with its default configuration): every frame a session reads goes
/// through the allocator (its read buffer grows and is split per frame), and glibc's malloc and
/// free were a sixth of the generator's time in a connect ramp.
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    let mut inv = match load::parse(std::env::args().skip(1).collect()) {
        Ok(i) => i,
        Err(e) => {
            eprintln!("presenced-load: {e}");
            return ExitCode::from(2);
        }
    };
    // Before any thread or worker process exists, so that all of them inherit it. What the
    // summary reports is the policy in force.
    if let Invocation::Run(o) | Invocation::Worker(o, _) = &mut inv {
        if o.sched == Sched::Batch {
            if let Err(e) = presenced::app::os::schedule_this_thread_as_batch() {
                eprintln!("presenced-load: --sched batch not applied ({e}); running as normal");
                o.sched = Sched::Normal;
            }
        }
    }
    let sys = actix_web::rt::System::new();
    match inv {
        Invocation::Help => {
            print!("{}", load::help());
            ExitCode::SUCCESS
        }
        Invocation::Worker(o, share) => {
            sys.block_on(load::worker_main(o, share));
            ExitCode::SUCCESS
        }
        Invocation::Run(o) => match sys.block_on(load::run(o)) {
            Ok(s) => {
                print!("{}", s.table());
                if s.sessions_connected == 0 {
                    ExitCode::from(1)
                } else {
                    ExitCode::SUCCESS
                }
            }
            Err(e @ LoadError::Usage(_)) => {
                eprintln!("presenced-load: {e}");
                ExitCode::from(2)
            }
            Err(e) => {
                eprintln!("presenced-load: {e}");
                ExitCode::from(1)
            }
        },
    }
}
