package main

import (
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"strings"
)

// newFlags makes a FlagSet whose errors come back as usage errors instead
// of exiting. Its usage text goes to stdout for --help only: the flag
// package also calls Usage on a bad flag, and stdout then carries -o json.
func newFlags(name, synopsis string) *flag.FlagSet {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(usageText{synopsis})
	fs.Usage = func() {}
	return fs
}

// usageText is a FlagSet's output while parsing: it discards what the flag
// package writes and remembers the synopsis for --help.
type usageText struct{ synopsis string }

func (usageText) Write(p []byte) (int, error) { return len(p), nil }

func printHelp(fs *flag.FlagSet) {
	u, _ := fs.Output().(usageText)
	fmt.Fprintf(os.Stdout, "Usage: cryptnbd %s\n\nFlags (each also read from the CRYPTNBD_* variable named after it):\n", u.synopsis)
	fs.SetOutput(os.Stdout)
	fs.PrintDefaults()
	fs.SetOutput(u)
}

// parse parses args, interleaving flags and positional arguments as users
// type them (disk create NAME --size 1G), then fills every flag not given
// on the command line from its CRYPTNBD_* environment variable.
func parse(fs *flag.FlagSet, args []string) ([]string, error) {
	var pos []string
	for {
		if err := fs.Parse(args); err != nil {
			if errors.Is(err, flag.ErrHelp) {
				printHelp(fs)
				return nil, flag.ErrHelp
			}
			return nil, usagef("%s: %v", fs.Name(), err)
		}
		args = fs.Args()
		if len(args) == 0 {
			break
		}
		pos = append(pos, args[0])
		args = args[1:]
	}
	set := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
	var err error
	fs.VisitAll(func(f *flag.Flag) {
		if set[f.Name] || err != nil {
			return
		}
		env := "CRYPTNBD_" + strings.ToUpper(strings.ReplaceAll(f.Name, "-", "_"))
		if v, ok := os.LookupEnv(env); ok {
			if serr := fs.Set(f.Name, v); serr != nil {
				err = usagef("%s=%q: %v", env, v, serr)
			}
		}
	})
	return pos, err
}

// dataDirFlag registers --data-dir with the default for this user.
func dataDirFlag(fs *flag.FlagSet) *string {
	return fs.String("data-dir", "/var/lib/cryptnbd", "directory holding disks, keys, the audit log and api.sock")
}

// newLogger logs text to a terminal and JSON otherwise (to a journal or a
// log collector), at the given level.
func newLogger(level, format string) (*slog.Logger, error) {
	var lv slog.Level
	if err := lv.UnmarshalText([]byte(level)); err != nil {
		return nil, usagef("--log-level %q: use debug, info, warn or error", level)
	}
	opts := &slog.HandlerOptions{Level: lv}
	switch format {
	case "auto":
		if st, err := os.Stderr.Stat(); err == nil && st.Mode()&os.ModeCharDevice != 0 {
			format = "text"
		} else {
			format = "json"
		}
	case "text", "json":
	default:
		return nil, usagef("--log-format %q: use auto, text or json", format)
	}
	if format == "text" {
		return slog.New(slog.NewTextHandler(os.Stderr, opts)), nil
	}
	return slog.New(slog.NewJSONHandler(os.Stderr, opts)), nil
}
