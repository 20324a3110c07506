//! The build queue: at most `slots` builds at once; the rest wait their
//! turn, and turns go round the waiting clients (one client's hundred
//! requests do not go before another client's first). The number waiting
//! is bounded.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

use super::Client;

pub struct Queue {
    slots: usize,
    max_waiting: usize,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    running: usize,
    /// Each client's waiters, oldest first.
    waiting: HashMap<Client, VecDeque<oneshot::Sender<Turn>>>,
    /// Clients with waiters, in the order their turns come.
    turns: VecDeque<Client>,
    queued: usize,
}

/// A build's turn: while it is held the build runs; dropping it hands the
/// slot to the next waiter.
pub struct Turn {
    queue: Arc<Queue>,
    armed: bool,
}

impl Drop for Turn {
    fn drop(&mut self) {
        if self.armed {
            self.queue.release();
        }
    }
}

/// The queue is full.
#[derive(Debug)]
pub struct Full {
    pub waiting: usize,
}

impl Queue {
    pub fn new(slots: usize, max_waiting: usize) -> Arc<Self> {
        Arc::new(Queue {
            slots: slots.max(1),
            max_waiting,
            state: Mutex::default(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits for `client`'s turn; `waited` is told whether it had to.
    pub async fn turn(
        self: &Arc<Self>,
        client: Client,
        waited: impl FnOnce(usize),
    ) -> Result<Turn, Full> {
        let receiver = {
            let mut state = self.lock();
            if state.running < self.slots && state.queued == 0 {
                state.running += 1;
                return Ok(Turn {
                    queue: self.clone(),
                    armed: true,
                });
            }
            if state.queued >= self.max_waiting {
                // Waiters whose clients left still count until purged.
                let State {
                    waiting,
                    turns,
                    queued,
                    ..
                } = &mut *state;
                for senders in waiting.values_mut() {
                    let before = senders.len();
                    senders.retain(|s| !s.is_closed());
                    *queued -= before - senders.len();
                }
                waiting.retain(|_, s| !s.is_empty());
                turns.retain(|c| waiting.contains_key(c));
            }
            if state.queued >= self.max_waiting {
                // Full: a client with fewer waiting than another takes the
                // place of that one's newest (turned away, as it would have
                // been had it come last); else this one is turned away. So
                // one client's hundred requests cannot shut out another's
                // first.
                let mine = state.waiting.get(&client).map_or(0, VecDeque::len);
                let heaviest = state
                    .waiting
                    .iter()
                    .map(|(c, s)| (s.len(), *c))
                    .max()
                    .filter(|(n, _)| *n > mine + 1);
                let Some((_, heaviest)) = heaviest else {
                    return Err(Full {
                        waiting: state.queued,
                    });
                };
                if let Some(senders) = state.waiting.get_mut(&heaviest) {
                    // Dropping the sender wakes its waiter with `Full`.
                    senders.pop_back();
                    state.queued -= 1;
                }
            }
            let (sender, receiver) = oneshot::channel();
            let mine = state.waiting.entry(client).or_default();
            mine.push_back(sender);
            if mine.len() == 1 {
                state.turns.push_back(client);
            }
            state.queued += 1;
            waited(state.queued);
            receiver
        };
        // A dropped sender: this waiter's place went to another client.
        receiver.await.map_err(|_| Full {
            waiting: self.max_waiting,
        })
    }

    /// Hands a finished build's slot to the next client in turn, or frees it.
    fn release(self: &Arc<Self>) {
        let mut state = self.lock();
        while let Some(client) = state.turns.pop_front() {
            let Some(senders) = state.waiting.get_mut(&client) else {
                continue;
            };
            let sender = senders.pop_front();
            if senders.is_empty() {
                state.waiting.remove(&client);
            } else {
                state.turns.push_back(client);
            }
            let Some(sender) = sender else { continue };
            state.queued -= 1;
            let turn = Turn {
                queue: self.clone(),
                armed: true,
            };
            match sender.send(turn) {
                Ok(()) => return,
                // That waiter left: its turn goes to the next.
                Err(mut turn) => turn.armed = false,
            }
        }
        state.running -= 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn turns_go_round_the_clients_and_a_full_queue_favours_the_lighter() {
        let queue = Queue::new(1, 5);
        let client = |n: u8| Client::of(std::net::IpAddr::from([192, 0, 2, n]));
        let (a, b, c) = (client(1), client(2), client(3));
        let first = queue.turn(a, |_| {}).await.unwrap();
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut waiters = Vec::new();
        let mut ask = |n: u32, client: Client| {
            let queue = queue.clone();
            let order = order.clone();
            waiters.push(tokio::spawn(async move {
                let turn = queue.turn(client, |_| {}).await;
                order.lock().unwrap().push((n, turn.is_ok()));
                tokio::task::yield_now().await;
                drop(turn);
            }));
        };
        // a waits three times, then b twice: full.
        for (n, who) in [(1, a), (2, a), (3, a), (4, b), (5, b)] {
            ask(n, who);
            tokio::task::yield_now().await;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        // b again: no one waits more than one over b, so b is turned away.
        assert!(queue.turn(b, |_| {}).await.is_err());
        // c, with none waiting, takes a's newest place.
        ask(6, c);
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        drop(first);
        for w in waiters {
            w.await.unwrap();
        }
        let order = order.lock().unwrap().clone();
        assert_eq!(
            order,
            [
                (3, false),
                (1, true),
                (4, true),
                (6, true),
                (2, true),
                (5, true)
            ]
        );
        // All slots back.
        let _again = queue.turn(a, |_| {}).await.unwrap();
    }
}
