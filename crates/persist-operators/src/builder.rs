//! Timely operators whose logic is a Rust future.
//!
//! A timely operator is a closure the worker calls ("schedules") when it has
//! something to do. Code that talks to persist is naturally `async`: it
//! waits for blob and consensus I/O and for the shard to change. The
//! [`AsyncOperatorBuilder`] bridges the two: the operator's logic is one
//! future that reads its inputs through [`AsyncInput::next`], writes its
//! outputs through [`AsyncOutput`] with [`Capability`]s it holds, and awaits
//! anything else it likes (persist calls, timers, channels).
//!
//! # How the future runs
//!
//! The future is only ever polled on the worker thread, from inside the
//! operator's schedule, with the tokio runtime the builder was given
//! entered (so `tokio::spawn`, timers and persist's background tasks
//! work). It is polled whenever timely schedules the operator: when input
//! data or input frontier changes arrive, and when anything the future
//! waits on wakes it. Its waker activates the operator through timely's
//! thread-safe activator, so I/O completing on a tokio thread reschedules
//! the operator (and unparks a parked worker).
//!
//! # Shutdown
//!
//! [`AsyncOperatorBuilder::build`] returns a [`ShutdownButton`]. Dropping
//! it (or calling [`ShutdownButton::press`]) drops the future at the
//! operator's next schedule: every capability it held is released, so the
//! operator's outputs become complete (an empty frontier) and downstream
//! operators can finish. From then on the operator discards its input.
//! The same happens when the future returns on its own.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::fmt::Debug;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

use timely::Container;
use timely::container::CapacityContainerBuilder;
use timely::dataflow::channels::pact::ParallelizationContract;
use timely::dataflow::operators::Capability;
use timely::dataflow::operators::generic::OutputBuilder;
use timely::dataflow::operators::generic::builder_rc::OperatorBuilder;
use timely::dataflow::{Scope, Stream, StreamVec};
use timely::progress::frontier::MutableAntichain;
use timely::progress::{Antichain, Timestamp};
use timely::scheduling::{Activator, SyncActivator};

/// Something that happened at an [`AsyncInput`].
#[derive(Debug)]
pub enum Event<T: Timestamp, D> {
    /// A batch of records sent at `time`.
    Data {
        /// The time the records were sent at; every record's own time (if
        /// it carries one) is at or after it.
        time: T,
        /// One capability at `time` for each output the input was connected
        /// to, in the order given to [`AsyncOperatorBuilder::new_input_for`];
        /// empty for a disconnected input. Hold one to keep the output
        /// frontier at `time` while working on the records.
        caps: Vec<Capability<T>>,
        /// The records.
        data: Vec<D>,
    },
    /// The input frontier advanced to this antichain: no record at a time
    /// not at or after it will arrive any more. Reported after every
    /// [`Event::Data`] that arrived before the advance. The empty antichain
    /// is the last event of an input.
    Progress(Antichain<T>),
}

/// The state an input shares between the operator, which fills it, and the
/// future, which drains it.
struct InputQueue<T: Timestamp, D> {
    events: VecDeque<Event<T, D>>,
    /// The last frontier reported to the future.
    frontier: Antichain<T>,
    /// Set once the empty frontier was queued.
    closed: bool,
    /// The task waiting for an event, if one is.
    waker: Option<Waker>,
}

/// The reading end of an operator input, owned by the operator's future.
///
/// Dropping it makes the operator discard that input's data from then on
/// (its capabilities are released at once).
pub struct AsyncInput<T: Timestamp, D> {
    queue: Rc<RefCell<InputQueue<T, D>>>,
}

impl<T: Timestamp, D> Debug for AsyncInput<T, D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let queue = self.queue.borrow();
        f.debug_struct("AsyncInput")
            .field("queued", &queue.events.len())
            .field("frontier", &queue.frontier)
            .field("closed", &queue.closed)
            .finish()
    }
}

impl<T: Timestamp, D> AsyncInput<T, D> {
    /// Waits for the next event of this input. Returns `None` once the
    /// input is complete and every event was taken (the last event before
    /// that is `Progress` of the empty antichain).
    ///
    /// Cancel-safe: an event is removed only when the future resolves.
    #[allow(clippy::should_implement_trait)] // async, unlike `Iterator::next`
    pub fn next(&mut self) -> impl Future<Output = Option<Event<T, D>>> + '_ {
        std::future::poll_fn(move |cx| self.poll_next(cx))
    }

    /// Takes the next event if one is queued, without waiting. `None` means
    /// nothing is queued now (see [`AsyncInput::is_closed`] for the end).
    pub fn try_next(&mut self) -> Option<Event<T, D>> {
        self.queue.borrow_mut().events.pop_front()
    }

    /// Whether the input is complete and drained: [`AsyncInput::next`]
    /// returns `None`.
    pub fn is_closed(&self) -> bool {
        let queue = self.queue.borrow();
        queue.closed && queue.events.is_empty()
    }

    /// The latest input frontier that was queued as an event (possibly
    /// ahead of the events the future has taken so far).
    pub fn frontier(&self) -> Antichain<T> {
        self.queue.borrow().frontier.clone()
    }

    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<Event<T, D>>> {
        let mut queue = self.queue.borrow_mut();
        if let Some(event) = queue.events.pop_front() {
            return Poll::Ready(Some(event));
        }
        if queue.closed {
            return Poll::Ready(None);
        }
        queue.waker = Some(cx.waker().clone());
        Poll::Pending
    }
}

/// The writing end of an operator output, owned by the operator's future.
///
/// Records are given with a [`Capability`] for this output; they are pushed
/// downstream at once (buffered into containers of timely's usual size).
pub struct AsyncOutput<T: Timestamp, D: Clone + 'static> {
    index: usize,
    output: OutputBuilder<T, CapacityContainerBuilder<Vec<D>>>,
}

impl<T: Timestamp, D: Clone + 'static> Debug for AsyncOutput<T, D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AsyncOutput")
            .field("index", &self.index)
            .finish_non_exhaustive()
    }
}

impl<T: Timestamp, D: Clone + 'static> AsyncOutput<T, D> {
    /// The output's index among the operator's outputs (the index of its
    /// initial capability).
    pub fn index(&self) -> usize {
        self.index
    }

    /// Sends one record at the capability's time.
    ///
    /// The capability must be one of this output's (debug builds assert
    /// it); records may carry times of their own at or after it.
    pub fn give(&mut self, cap: &Capability<T>, record: D) {
        let mut output = self.output.activate();
        output.session(cap).give(record);
    }

    /// Sends many records at the capability's time.
    pub fn give_iterator<I: IntoIterator<Item = D>>(&mut self, cap: &Capability<T>, records: I) {
        let mut output = self.output.activate();
        output.session(cap).give_iterator(records.into_iter());
    }

    /// Sends a whole container at the capability's time, leaving `records`
    /// empty (its allocation may be reused).
    pub fn give_container(&mut self, cap: &Capability<T>, records: &mut Vec<D>) {
        let mut output = self.output.activate();
        output.session(cap).give_container(records);
        records.clear();
    }
}

/// Shuts an async operator down when pressed or dropped: its future is
/// dropped at the next schedule, releasing every capability it held.
///
/// Not `Send`: it belongs to the worker that built the operator.
#[derive(Debug)]
pub struct ShutdownButton {
    pressed: Rc<Cell<bool>>,
    activator: Activator,
}

impl ShutdownButton {
    /// Shuts the operator down (idempotent).
    pub fn press(&mut self) {
        if !self.pressed.replace(true) {
            self.activator.activate();
        }
    }
}

impl Drop for ShutdownButton {
    fn drop(&mut self) {
        self.press();
    }
}

/// Wakes a future by activating its operator from any thread.
struct ActivateOnWake(SyncActivator);

impl Wake for ActivateOnWake {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        // Fails only once the worker is gone, when there is nothing to wake.
        let _ = self.0.activate();
    }
}

/// Moves one input's data and frontier changes from timely into its queue;
/// returns nothing, and discards everything once the future dropped the
/// input.
type Pump<T> = Box<dyn FnMut(&MutableAntichain<T>)>;

/// Builds an operator whose logic is a future (see the module docs).
///
/// Create outputs before the inputs that feed them: an input names the
/// outputs it is connected to when it is created, and an output created
/// later is not connected to it.
pub struct AsyncOperatorBuilder<'scope, T: Timestamp> {
    name: String,
    builder: OperatorBuilder<'scope, T>,
    runtime: tokio::runtime::Handle,
    pumps: Vec<Pump<T>>,
    activator: Activator,
    sync_activator: SyncActivator,
}

impl<T: Timestamp> Debug for AsyncOperatorBuilder<'_, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AsyncOperatorBuilder")
            .field("name", &self.name)
            .field("inputs", &self.pumps.len())
            .finish_non_exhaustive()
    }
}

impl<'scope, T: Timestamp> AsyncOperatorBuilder<'scope, T> {
    /// A builder of an operator named `name` in `scope`, whose future runs
    /// with `runtime` entered.
    pub fn new(name: String, scope: Scope<'scope, T>, runtime: tokio::runtime::Handle) -> Self {
        let builder = OperatorBuilder::new(name.clone(), scope);
        let address = builder.operator_info().address;
        let activator = scope.activator_for(Rc::clone(&address));
        let sync_activator = scope.worker().sync_activator_for(address.to_vec());
        AsyncOperatorBuilder {
            name,
            builder,
            runtime,
            pumps: Vec::new(),
            activator,
            sync_activator,
        }
    }

    /// Adds an output of records `D`, connected to no input created so
    /// far. Its initial capability (at the minimum time) is the one with
    /// the output's index in the vector the future's constructor receives.
    pub fn new_output<D: Clone + 'static>(
        &mut self,
    ) -> (AsyncOutput<T, D>, StreamVec<'scope, T, D>) {
        let index = self.builder.shape().outputs();
        let (output, stream) =
            self.builder
                .new_output_connection::<Vec<D>, _>(std::iter::empty::<(
                    usize,
                    Antichain<T::Summary>,
                )>());
        let output = AsyncOutput {
            index,
            output: OutputBuilder::from(output),
        };
        (output, stream)
    }

    /// Adds an input reading `stream` through `pact`, connected to none of
    /// the outputs: its frontier holds back no output, and its events carry
    /// no capabilities.
    pub fn new_disconnected_input<D, P>(
        &mut self,
        stream: Stream<'scope, T, Vec<D>>,
        pact: P,
    ) -> AsyncInput<T, D>
    where
        D: 'static,
        P: ParallelizationContract<T, Vec<D>>,
        Vec<D>: Container,
    {
        self.new_input_for(stream, pact, &[])
    }

    /// Adds an input reading `stream` through `pact`, connected (with the
    /// identity summary) to each output in `outputs`, given by
    /// [`AsyncOutput::index`]. Each of its data events carries one
    /// capability per connected output, and the frontiers of those outputs
    /// are held back by this input's frontier.
    pub fn new_input_for<D, P>(
        &mut self,
        stream: Stream<'scope, T, Vec<D>>,
        pact: P,
        outputs: &[usize],
    ) -> AsyncInput<T, D>
    where
        D: 'static,
        P: ParallelizationContract<T, Vec<D>>,
        Vec<D>: Container,
    {
        let connection: Vec<(usize, Antichain<T::Summary>)> = outputs
            .iter()
            .map(|&o| (o, Antichain::from_elem(Default::default())))
            .collect();
        let mut handle = self.builder.new_input_connection(stream, pact, connection);
        let queue = Rc::new(RefCell::new(InputQueue {
            events: VecDeque::new(),
            frontier: Antichain::from_elem(T::minimum()),
            closed: false,
            waker: None,
        }));
        let shared = Rc::clone(&queue);
        let outputs = outputs.to_vec();
        self.pumps
            .push(Box::new(move |frontier: &MutableAntichain<T>| {
                let mut queue = shared.borrow_mut();
                if Rc::strong_count(&shared) == 1 {
                    // The future dropped the input: discard its data.
                    queue.events.clear();
                    handle.for_each(|_cap, data| data.clear());
                    return;
                }
                let before = queue.events.len();
                handle.for_each(|cap, data| {
                    let caps = outputs.iter().map(|&o| cap.retain(o)).collect();
                    queue.events.push_back(Event::Data {
                        time: cap.time().clone(),
                        caps,
                        data: std::mem::take(data),
                    });
                });
                if !queue.closed && frontier.frontier() != queue.frontier.borrow() {
                    queue.frontier = frontier.frontier().to_owned();
                    queue.closed = queue.frontier.is_empty();
                    let progress = Event::Progress(queue.frontier.clone());
                    queue.events.push_back(progress);
                }
                if queue.events.len() != before
                    && let Some(waker) = queue.waker.take()
                {
                    waker.wake();
                }
            }));
        AsyncInput { queue }
    }

    /// Builds the operator. `constructor` receives one capability per
    /// output (at the minimum time, in output order) and returns the
    /// future that is the operator's logic; it runs until it returns or
    /// the returned button is pressed or dropped.
    ///
    /// The operator reports itself incomplete while the future is alive, so
    /// the dataflow does not finish under a future that still has work (for
    /// example returning leases or appending a last batch).
    pub fn build<B, F>(self, constructor: B) -> ShutdownButton
    where
        B: FnOnce(Vec<Capability<T>>) -> F,
        F: Future<Output = ()> + 'static,
    {
        let pressed = Rc::new(Cell::new(false));
        let button = ShutdownButton {
            pressed: Rc::clone(&pressed),
            activator: self.activator,
        };
        let waker = Waker::from(Arc::new(ActivateOnWake(self.sync_activator)));
        let runtime = self.runtime;
        let mut pumps = self.pumps;
        self.builder.build_reschedule(move |caps| {
            let mut logic: Option<Pin<Box<F>>> = Some(Box::pin(constructor(caps)));
            move |frontiers| {
                if pressed.get() {
                    logic = None;
                }
                for (pump, frontier) in pumps.iter_mut().zip(frontiers) {
                    pump(frontier);
                }
                if let Some(future) = logic.as_mut() {
                    let _runtime = runtime.enter();
                    let mut cx = Context::from_waker(&waker);
                    if future.as_mut().poll(&mut cx).is_ready() {
                        logic = None;
                        // Release what the future's inputs still queued.
                        for (pump, frontier) in pumps.iter_mut().zip(frontiers) {
                            pump(frontier);
                        }
                    }
                }
                logic.is_some()
            }
        });
        button
    }
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;
    use std::collections::BTreeMap;
    use std::rc::Rc;
    use std::time::{Duration, Instant};

    use timely::dataflow::channels::pact::{Exchange, Pipeline};
    use timely::dataflow::operators::vec::Input;
    use timely::dataflow::operators::{Inspect, Probe};
    use timely::progress::Antichain;

    use super::*;

    /// Fails a test that stops making progress instead of hanging it.
    const GUARD: Duration = Duration::from_secs(60);

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("a runtime")
    }

    /// Runs `func` on `workers` timely workers and returns their results.
    fn on_workers<R: Send + 'static>(
        workers: usize,
        func: impl Fn(&mut timely::worker::Worker) -> R + Send + Sync + 'static,
    ) -> Vec<R> {
        timely::execute(timely::Config::process(workers), move |w| func(w))
            .expect("timely starts")
            .join()
            .into_iter()
            .map(|r| r.expect("worker succeeds"))
            .collect()
    }

    /// Forwards each record (times ten) with the capability it came with and
    /// reports every input event it sees.
    #[test]
    fn inputs_outputs_and_frontiers_in_order() {
        for workers in [1, 4] {
            let rt = runtime();
            let handle = rt.handle().clone();
            let results = on_workers(workers, move |worker| {
                let seen = Rc::new(RefCell::new(Vec::new()));
                let out = Rc::new(RefCell::new(Vec::new()));
                let (mut input, probe, _button) = worker.dataflow::<u64, _, _>(|scope| {
                    let (input, stream) = scope.new_input::<u64>();
                    let mut builder =
                        AsyncOperatorBuilder::new("times_ten".into(), scope, handle.clone());
                    let (mut output, result) = builder.new_output::<u64>();
                    let mut data = builder.new_input_for(
                        stream,
                        Exchange::new(|x: &u64| *x),
                        &[output.index()],
                    );
                    let events = Rc::clone(&seen);
                    let button = builder.build(move |caps| async move {
                        drop(caps);
                        while let Some(event) = data.next().await {
                            match event {
                                Event::Data { time, caps, data } => {
                                    assert_eq!(caps.len(), 1);
                                    assert_eq!(caps[0].time(), &time);
                                    events.borrow_mut().push(format!("data@{time}"));
                                    output
                                        .give_iterator(&caps[0], data.into_iter().map(|x| x * 10));
                                }
                                Event::Progress(f) => events
                                    .borrow_mut()
                                    .push(format!("progress{:?}", f.elements())),
                            }
                        }
                        events.borrow_mut().push("end".into());
                    });
                    let sink = Rc::clone(&out);
                    let (probe, _) = result
                        .inspect_time(move |t, x| sink.borrow_mut().push((*t, *x)))
                        .probe();
                    (input, probe, button)
                });
                let index = worker.index() as u64;
                for round in 0..3u64 {
                    input.send(round * 100 + index);
                    input.advance_to(round + 1);
                    let start = Instant::now();
                    while probe.less_than(&(round + 1)) {
                        assert!(start.elapsed() < GUARD, "stuck at round {round}");
                        worker.step();
                    }
                }
                drop(input);
                while !probe.done() {
                    worker.step();
                }
                let seen = seen.borrow().clone();
                let out = out.borrow().clone();
                (seen, out)
            });
            let mut all: Vec<(u64, u64)> = results.iter().flat_map(|(_, o)| o.clone()).collect();
            all.sort();
            let mut expected: Vec<(u64, u64)> = (0..3u64)
                .flat_map(|r| (0..workers as u64).map(move |i| (r, (r * 100 + i) * 10)))
                .collect();
            expected.sort();
            assert_eq!(all, expected, "{workers} workers");
            for (seen, _) in &results {
                // Every worker sees its frontier advance to 1, 2, 3, then
                // end; data at a time comes before the progress past it.
                let progress: Vec<_> = seen.iter().filter(|e| e.starts_with("progress")).collect();
                assert_eq!(
                    progress,
                    ["progress[1]", "progress[2]", "progress[3]", "progress[]"]
                );
                assert_eq!(seen.last().map(String::as_str), Some("end"));
                for (i, event) in seen.iter().enumerate() {
                    if let Some(t) = event.strip_prefix("data@") {
                        let t: u64 = t.parse().unwrap();
                        let later = format!("progress[{}]", t + 1);
                        assert!(!seen[..i].contains(&later), "{seen:?}");
                    }
                }
            }
        }
    }

    /// An operator with no input is rescheduled only by its waker: a tokio
    /// timer firing on another thread must wake it.
    #[test]
    fn woken_by_io_on_the_runtime() {
        let rt = runtime();
        let handle = rt.handle().clone();
        let results = on_workers(2, move |worker| {
            let out = Rc::new(RefCell::new(Vec::new()));
            let sink = Rc::clone(&out);
            let (probe, _button) = worker.dataflow::<u64, _, _>(|scope| {
                let mut builder = AsyncOperatorBuilder::new("timer".into(), scope, handle.clone());
                let (mut output, stream) = builder.new_output::<&'static str>();
                let button = builder.build(move |mut caps| async move {
                    let mut cap = caps.remove(0);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    output.give(&cap, "after sleep");
                    cap.downgrade(&5);
                    let (tx, rx) = tokio::sync::oneshot::channel();
                    tokio::spawn(async move {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        let _ = tx.send("from a task");
                    });
                    let msg = rx.await.unwrap_or("dropped");
                    output.give(&cap, msg);
                });
                let (probe, _) = stream
                    .inspect_time(move |t, x| sink.borrow_mut().push((*t, *x)))
                    .probe();
                (probe, button)
            });
            let start = Instant::now();
            while !probe.done() {
                assert!(start.elapsed() < GUARD, "never woken");
                // Parking without a timeout: only an activation wakes us.
                worker.step_or_park(None);
            }
            out.borrow().clone()
        });
        for out in results {
            assert_eq!(out, vec![(0, "after sleep"), (5, "from a task")]);
        }
    }

    /// Dropping the button drops the future and releases its capabilities,
    /// even while it waits forever.
    #[test]
    fn dropping_the_button_shuts_the_operator_down() {
        let rt = runtime();
        let handle = rt.handle().clone();
        let results = on_workers(2, move |worker| {
            let dropped = Rc::new(Cell::new(false));
            let flag = Rc::clone(&dropped);
            let (mut input, probe, button) = worker.dataflow::<u64, _, _>(|scope| {
                let (input, stream) = scope.new_input::<u64>();
                let mut builder = AsyncOperatorBuilder::new("stuck".into(), scope, handle.clone());
                let (_output, out) = builder.new_output::<u64>();
                let _data = builder.new_disconnected_input(stream, Pipeline);
                struct OnDrop(Rc<Cell<bool>>);
                impl Drop for OnDrop {
                    fn drop(&mut self) {
                        self.0.set(true);
                    }
                }
                let button = builder.build(move |caps| async move {
                    let _caps = caps;
                    let _on_drop = OnDrop(flag);
                    std::future::pending::<()>().await;
                });
                let (probe, _) = out.probe();
                (input, probe, button)
            });
            for t in 1..10 {
                input.send(t);
                input.advance_to(t);
                worker.step();
            }
            let held = probe.with_frontier(|f| f.to_owned());
            drop(button);
            let start = Instant::now();
            while !probe.done() {
                assert!(start.elapsed() < GUARD, "not shut down");
                worker.step();
            }
            // The input keeps flowing (and is discarded) after shutdown.
            input.send(99);
            input.advance_to(100);
            worker.step();
            (held, dropped.get())
        });
        for (held, dropped) in results {
            assert_eq!(
                held,
                Antichain::from_elem(0),
                "the future held its capability"
            );
            assert!(dropped, "the future was dropped");
        }
    }

    /// Many workers send to one: the operator on worker 0 sums each time's
    /// records once its input frontier passes the time.
    #[test]
    fn several_workers_feed_one_aggregating_operator() {
        let workers = 4;
        let rt = runtime();
        let handle = rt.handle().clone();
        let results = on_workers(workers, move |worker| {
            let out = Rc::new(RefCell::new(Vec::new()));
            let sink = Rc::clone(&out);
            let (mut input, probe, _button) = worker.dataflow::<u64, _, _>(|scope| {
                let (input, stream) = scope.new_input::<u64>();
                let mut builder = AsyncOperatorBuilder::new("sum".into(), scope, handle.clone());
                let (mut output, sums) = builder.new_output::<(u64, u64)>();
                let mut data = builder.new_disconnected_input(stream, Exchange::new(|_| 0));
                let button = builder.build(move |mut caps| async move {
                    let mut cap = caps.remove(0);
                    let mut pending: BTreeMap<u64, u64> = BTreeMap::new();
                    while let Some(event) = data.next().await {
                        match event {
                            Event::Data { time, caps, data } => {
                                assert!(
                                    caps.is_empty(),
                                    "disconnected inputs carry no capabilities"
                                );
                                *pending.entry(time).or_default() += data.iter().sum::<u64>();
                            }
                            Event::Progress(frontier) => {
                                let done: Vec<u64> = pending
                                    .keys()
                                    .copied()
                                    .filter(|t| !frontier.less_equal(t))
                                    .collect();
                                for t in done {
                                    let sum = pending.remove(&t).unwrap_or_default();
                                    output.give(&cap.delayed(&t), (t, sum));
                                }
                                match frontier.as_option() {
                                    Some(&f) => cap.downgrade(&f.max(*cap.time())),
                                    None => return,
                                }
                            }
                        }
                    }
                });
                let (probe, _) = sums.inspect(move |x| sink.borrow_mut().push(*x)).probe();
                (input, probe, button)
            });
            for t in 0..5u64 {
                input.send(t + 1);
                input.send(10);
                input.advance_to(t + 1);
            }
            drop(input);
            let start = Instant::now();
            while !probe.done() {
                assert!(start.elapsed() < GUARD, "stuck");
                worker.step();
            }
            out.borrow().clone()
        });
        let mut all: Vec<(u64, u64)> = results.into_iter().flatten().collect();
        all.sort();
        let expected: Vec<(u64, u64)> = (0..5u64)
            .map(|t| (t, workers as u64 * (t + 1 + 10)))
            .collect();
        assert_eq!(all, expected);
    }
}
