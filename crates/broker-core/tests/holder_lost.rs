//! How a callback job ends when its worker's connection goes: closed (the testenv-client's
//! process is gone) → WORK_FAIL; failed (timed out, cut: the client may be alive) → WORK_EXCEPTION
//! "testenv: holder connection lost", which a resuming testenv-worker tells apart.

mod sim;

use gearman_proto::PacketType as T;
use sim::Sim;
use testenv_proto::resume::HOLDER_CONNECTION_LOST;

/// A testenv-worker (2) submitted `function`; a holder (3) runs it. Returns (submitter, holder).
fn running(s: &mut Sim, function: &str) -> (broker_core::ConnId, broker_core::ConnId) {
    let te_worker = s.conn(2);
    let holder = s.conn(3);
    s.send(holder, T::CanDo, &[function.as_bytes()]);
    s.submit(te_worker, T::SubmitJob, function, "", "te data");
    s.grab(holder).expect("the holder takes the job");
    (te_worker, holder)
}

#[test]
fn a_closed_holder_connection_fails_the_callback_job() {
    let mut s = Sim::new();
    let (te_worker, holder) = running(&mut s, "callback_1");
    s.broker.disconnect(holder, &mut s.out);
    assert_eq!(s.types(te_worker), vec![T::WorkFail]);
}

#[test]
fn a_lost_holder_connection_raises_an_exception_on_callback_jobs_only() {
    let mut s = Sim::new();
    let (te_worker, holder) = running(&mut s, "callback_1");
    s.broker.disconnect_lost(holder, &mut s.out);
    let got = s.take(te_worker);
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].ptype, T::WorkException);
    assert_eq!(&got[0].args[1][..], HOLDER_CONNECTION_LOST.as_bytes());

    // Any other foreground job fails as before.
    let mut s = Sim::new();
    let (client, worker) = running(&mut s, "reverse");
    s.broker.disconnect_lost(worker, &mut s.out);
    assert_eq!(s.types(client), vec![T::WorkFail]);
}
