package blobstore

import (
	"cmp"
	"context"
	"slices"
	"sync"

	"github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/blob"
	"github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/pageblob"
)

// allocWindow is the span of one Get Page Ranges call and one cache entry.
// A window is fetched once and served from memory until a write, clear or
// resize touches it.
const allocWindow = 256 << 20

// span is a half-open byte range of valid (written, not cleared) pages.
type span struct{ start, end int64 }

// allocCache caches Get Page Ranges per window. mu guards wins; the service
// calls happen outside it.
//
// A fetch that overlaps a write must not cache what it saw, since the list
// may predate the write. So every write, clear or resize bumps the
// generation of the windows it touched when it finishes (succeeded or not),
// and a fetch stores its result only if its window's generation is the one
// it started with. A write that landed before the fetch read the list is
// either in the list or bumps the generation after the fetch began; either
// way the cache never holds a list older than a completed write.
type allocCache struct {
	mu   sync.Mutex
	wins map[int64]*allocWin
}

type allocWin struct {
	gen   uint64
	valid bool
	spans []span
}

// invalidate forgets the windows overlapping [off, off+n).
func (c *allocCache) invalidate(off, n int64) {
	if n <= 0 {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	for w := off / allocWindow; w <= (off+n-1)/allocWindow; w++ {
		if e := c.wins[w]; e != nil {
			e.gen++
			e.valid, e.spans = false, nil
		}
	}
}

// lookup returns window w's spans if cached, or else its generation, which
// the caller hands to store after fetching.
func (c *allocCache) lookup(w int64) (spans []span, gen uint64, ok bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.wins == nil {
		c.wins = make(map[int64]*allocWin)
	}
	e := c.wins[w]
	if e == nil {
		e = &allocWin{}
		c.wins[w] = e
	}
	return e.spans, e.gen, e.valid
}

func (c *allocCache) store(w int64, gen uint64, spans []span) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if e := c.wins[w]; e != nil && e.gen == gen {
		e.valid, e.spans = true, spans
	}
}

// windowSpans returns the valid page ranges inside [start, end), which lies
// within one window.
func (s *Store) windowSpans(ctx context.Context, start, end int64) ([]span, error) {
	w := start / allocWindow
	wStart := w * allocWindow
	wEnd := min(wStart+allocWindow, s.size.Load())
	spans, gen, ok := s.alloc.lookup(w)
	if !ok {
		var err error
		spans, err = s.fetchSpans(ctx, wStart, wEnd)
		if err != nil {
			return nil, err
		}
		s.alloc.store(w, gen, spans)
	}
	return spans, nil
}

// fetchSpans asks the service for the valid page ranges in [start, end).
func (s *Store) fetchSpans(ctx context.Context, start, end int64) ([]span, error) {
	if err := s.acquire(ctx); err != nil {
		return nil, err
	}
	defer s.release()
	opts := &pageblob.GetPageRangesOptions{Range: blob.HTTPRange{Offset: start, Count: end - start}}
	if s.snapshot != "" {
		opts.Snapshot = &s.snapshot
	}
	var got []span
	pager := s.pb.NewGetPageRangesPager(opts)
	for pager.More() {
		page, err := pager.NextPage(ctx)
		if err != nil {
			return nil, ioError("get page ranges", err)
		}
		for _, r := range page.PageRange {
			if r == nil || r.Start == nil || r.End == nil {
				continue
			}
			a, b := max(*r.Start, start), min(*r.End+1, end) // End is inclusive
			if a < b {
				got = append(got, span{a, b})
			}
		}
	}
	// The service lists ranges in order; sorting and merging anyway keeps
	// Allocated's runs well-formed whatever a server sends.
	slices.SortFunc(got, func(x, y span) int { return cmp.Compare(x.start, y.start) })
	var spans []span
	for _, r := range got {
		if n := len(spans); n > 0 && spans[n-1].end >= r.start {
			spans[n-1].end = max(spans[n-1].end, r.end)
			continue
		}
		spans = append(spans, r)
	}
	return spans, nil
}
