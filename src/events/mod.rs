//! The event catalog: the CloudEvents envelope, one type per event, the queue each travels on.
