package nbdtest

import (
	"context"
	"fmt"
	"sync"

	"github.com/cryptnbd/cryptnbd/nbd"
)

// Catalog is an nbd.Catalog over a fixed set of backends. The name ""
// opens the first export added unless one is named "". It counts opens
// and releases so tests can check that every export is released. It is
// safe for concurrent use.
type Catalog struct {
	mu      sync.Mutex
	order   []string
	exports map[string]catalogEntry
	open    int
}

type catalogEntry struct {
	info nbd.ExportInfo
	be   nbd.Backend
}

// NewCatalog returns an empty catalog.
func NewCatalog() *Catalog {
	return &Catalog{exports: make(map[string]catalogEntry)}
}

// Add registers an export, replacing one of the same name.
func (c *Catalog) Add(info nbd.ExportInfo, be nbd.Backend) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if _, ok := c.exports[info.Name]; !ok {
		c.order = append(c.order, info.Name)
	}
	c.exports[info.Name] = catalogEntry{info, be}
}

// Export implements nbd.Catalog.
func (c *Catalog) Export(ctx context.Context, name string) (*nbd.Export, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	e, ok := c.exports[name]
	if !ok && name == "" && len(c.order) > 0 {
		e, ok = c.exports[c.order[0]], true
	}
	if !ok {
		return nil, fmt.Errorf("nbdtest: export %q: %w", name, nbd.ErrUnknownExport)
	}
	c.open++
	var once sync.Once
	return &nbd.Export{ExportInfo: e.info, Backend: e.be, Release: func() {
		once.Do(func() {
			c.mu.Lock()
			c.open--
			c.mu.Unlock()
		})
	}}, nil
}

// Exports implements nbd.Catalog, in the order the exports were added.
func (c *Catalog) Exports(ctx context.Context) ([]nbd.ExportInfo, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	infos := make([]nbd.ExportInfo, 0, len(c.order))
	for _, n := range c.order {
		infos = append(infos, c.exports[n].info)
	}
	return infos, nil
}

// Open reports how many exports are opened and not yet released.
func (c *Catalog) Open() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.open
}
