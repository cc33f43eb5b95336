//! Handler timeouts that measure the handler, not the agent.
//!
//! A plain `tokio::time::timeout` measures wall-clock time. When the agent itself is stalled
//! (SIGSTOP, a swapped-out process, a starved VM) its timers fire late, all at once, and every
//! handler in flight looks timed out although the worker answered long ago: its reply is
//! sitting unread in the pipe. Killing that healthy worker re-runs the effects of every event
//! it had finished (measured before this module: 23 of 100 events re-executed after an 8 s
//! SIGSTOP of the agent).
//!
//! [`timeout`] spends its budget in short steps and charges each step at most a little more
//! than it asked for: a step that took far longer means the agent was not running, and that
//! time is not the handler's. Before giving up it yields once more, so that replies made
//! readable by the same wake-up are read first.

use std::future::Future;
use std::time::{Duration, Instant};

/// Length of one step of the budget.
const STEP: Duration = Duration::from_millis(100);
/// How late a step may be and still be charged in full (timer granularity, a busy runtime).
const SLACK: Duration = Duration::from_millis(50);

/// The budget ran out while the agent was running.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Elapsed;

/// Awaits `fut` for at most `budget` of the time this process actually ran.
pub async fn timeout<F: Future>(budget: Duration, fut: F) -> Result<F::Output, Elapsed> {
    let mut fut = std::pin::pin!(fut);
    let mut used = Duration::ZERO;
    while used < budget {
        let step = (budget - used).min(STEP);
        let started = Instant::now();
        match tokio::time::timeout(step, fut.as_mut()).await {
            Ok(v) => return Ok(v),
            Err(_) => used += started.elapsed().min(step + SLACK),
        }
    }
    // The last step may have ended in the same wake-up that made the answer readable: let the
    // readers run, then look once more.
    for _ in 0..2 {
        tokio::task::yield_now().await;
        if let Ok(v) = tokio::time::timeout(Duration::ZERO, fut.as_mut()).await {
            return Ok(v);
        }
    }
    Err(Elapsed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "current_thread")]
    async fn a_fast_future_finishes_and_a_slow_one_times_out() {
        assert_eq!(
            timeout(Duration::from_millis(200), async { 7 }).await,
            Ok(7)
        );
        let t = Instant::now();
        let r = timeout(
            Duration::from_millis(250),
            tokio::time::sleep(Duration::from_secs(5)),
        )
        .await;
        assert_eq!(r, Err(Elapsed));
        let took = t.elapsed();
        assert!(took >= Duration::from_millis(250), "{took:?}");
        assert!(took < Duration::from_secs(2), "{took:?}");
    }

    /// The runtime blocked for 1.5 s (as a SIGSTOP of the agent would) does not use up a 1 s
    /// budget: the answer, which comes 10 ms after the stall ends, is still awaited. (With a
    /// plain `tokio::time::timeout` this is `Elapsed`.)
    #[tokio::test(flavor = "current_thread")]
    async fn time_the_agent_did_not_run_is_not_charged() {
        let (tx, rx) = tokio::sync::oneshot::channel::<u8>();
        let waiter = tokio::spawn(timeout(Duration::from_secs(1), rx));
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(1100)).await;
            tokio::time::sleep(Duration::from_millis(10)).await;
            let _ = tx.send(1);
        });
        tokio::task::yield_now().await;
        // The whole runtime stops: no timer, no reader runs.
        std::thread::sleep(Duration::from_millis(1500));
        let r = waiter.await.unwrap();
        assert!(matches!(r, Ok(Ok(1))), "{r:?}");
    }
}
