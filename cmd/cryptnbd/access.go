package main

import (
	"context"
	"flag"

	"github.com/cryptnbd/cryptnbd/cmd/cryptnbd/internal/daemon"
)

// accessFlags registers --allow and --allow-ro.
func accessFlags(fs *flag.FlagSet) (allow, allowRO *[]string) {
	a, ro := &listFlag{}, &listFlag{}
	fs.Var(a, "allow", "who may open the disk over NBD: a CIDR (10.0.0.0/8) or a client-certificate identity (CN, DNS or URI name); repeatable")
	fs.Var(ro, "allow-ro", "like --allow, but read-only: writes get EPERM and READ_ONLY is advertised; repeatable")
	return (*[]string)(a), (*[]string)(ro)
}

func diskUpdate(ctx context.Context, args []string) error {
	fs := newFlags("disk update", "disk update NAME [--allow SUBJECT ...] [--allow-ro SUBJECT ...] [--clear-access]")
	dataDir := dataDirFlag(fs)
	allow, allowRO := accessFlags(fs)
	clearAll := fs.Bool("clear-access", false, "remove every access rule (back to: verified TLS clients and loopback)")
	out := outputFlag(fs)
	pos, err := parse(fs, args)
	if err != nil {
		return err
	}
	name, err := oneName("disk update", pos)
	if err != nil {
		return err
	}
	if err := checkOutput(*out); err != nil {
		return err
	}
	if *clearAll == (len(*allow)+len(*allowRO) > 0) {
		return usagef("disk update: give --allow/--allow-ro rules, or --clear-access")
	}
	for _, list := range [][]string{*allow, *allowRO} {
		if err := daemon.ValidateSubjects(list); err != nil {
			return usagef("disk update: %v", err)
		}
	}
	c, done, err := connect(ctx, *dataDir, nil)
	if err != nil {
		return err
	}
	defer done()
	di, err := c.SetAccess(ctx, name, daemon.Access{Allow: *allow, AllowReadOnly: *allowRO})
	if err != nil {
		return err
	}
	return printDisks(*out, []daemon.DiskInfo{di}, true)
}
