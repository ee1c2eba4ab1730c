package blobstore

import (
	"context"
	"time"
)

// renew keeps the lease, renewing every third of its duration d, from the
// acquisition request sent at acquired. It exits when stop is closed or the
// lease is lost.
//
// A renewal refused with a lease error means someone broke or took the
// lease: lost at once. Other failures (network, throttling, 5xx) are retried
// every second; if no renewal has succeeded for a whole duration the lease
// may have expired and been taken, so the Store gives it up. Safety never
// depends on this clock: every write carries the lease ID and the service
// refuses it once the lease is not ours.
func (s *Store) renew(d time.Duration, acquired time.Time) {
	defer close(s.renewDone)
	// base ends a renewal in flight when Close stops the loop, so Close
	// need not wait out the request's timeout.
	base, cancelBase := context.WithCancel(context.Background())
	defer cancelBase()
	go func() {
		select {
		case <-s.stop:
			cancelBase()
		case <-base.Done():
		}
	}()
	every := d / 3
	last := acquired
	t := time.NewTimer(every)
	defer t.Stop()
	for {
		select {
		case <-s.stop:
			return
		case <-t.C:
		}
		sent := time.Now()
		ctx, cancel := context.WithTimeout(base, every)
		_, err := s.lc.RenewLease(ctx, nil)
		cancel()
		switch {
		case base.Err() != nil:
			return
		case err == nil:
			last = sent
			t.Reset(every)
		case isLeaseError(err):
			s.markLost(err)
			return
		case time.Since(last) >= d:
			s.markLost(err)
			return
		default:
			s.log.Warn("blobstore: lease renewal failed; retrying", "err", err, "since_renewed", time.Since(last).Round(time.Millisecond))
			t.Reset(min(every, time.Second))
		}
	}
}

// markLost records that the lease is gone, once: later writes fail without
// a request, and OnLeaseLost runs in its own goroutine (it may suspend the
// disk, which waits for the very write that found the loss).
func (s *Store) markLost(cause error) {
	s.lost.Store(true)
	s.lostOnce.Do(func() {
		s.log.Error("blobstore: lease lost; writes now fail", "err", cause)
		if s.onLost != nil {
			go s.onLost()
		}
	})
}

// LeaseLost reports whether the Store has lost its lease.
func (s *Store) LeaseLost() bool { return s.lost.Load() }

// stopRenewal ends the renewal goroutine and waits for it.
func (s *Store) stopRenewal() {
	close(s.stop)
	<-s.renewDone
}
