package sources

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/fsnotify/fsnotify"

	"github.com/reverst-dev/reverst/groups"
)

// file is a definition kept in a file. It watches the file's directory
// rather than the file, because that is where every way of changing a file
// shows: a write in place, an editor's write-to-temp-and-rename, a delete
// and recreate, and the symlink swap of a Kubernetes ConfigMap volume
// (groups.yml -> ..data/groups.yml, with ..data re-pointed at a new
// timestamped directory).
type file struct {
	path string
	dir  string
	opts Options
	r    *reloader
}

func newFile(path string, opts Options, m *metrics) *file {
	if abs, err := filepath.Abs(path); err == nil {
		path = abs
	}
	name := "file " + path
	return &file{path: path, dir: filepath.Dir(path), opts: opts, r: newReloader(name, opts.Logger, m)}
}

func (f *file) String() string { return f.r.name }

func (f *file) Status() error { return f.r.Status() }

// Load reads and validates the file.
func (f *file) Load(context.Context) (*groups.Config, error) {
	data, err := readFile(f.path, f.opts.MaxBytes)
	if err != nil {
		err = fmt.Errorf("%s: %w", f, err)
		f.r.fail(err)
		return nil, err
	}
	return f.r.load(data)
}

// Watch follows the file for the life of ctx. When the directory itself
// goes away it keeps trying to watch it again, with backoff, and reads the
// file as soon as the watch is back.
func (f *file) Watch(ctx context.Context, apply func(*groups.Config) error) error {
	retry := retryBackoff(100*time.Millisecond, f.opts.MaxBackoff)
	for {
		err := f.watchDir(ctx, apply, retry.Reset)
		if ctx.Err() != nil {
			return ctx.Err()
		}
		f.r.fail(fmt.Errorf("%s: watching %s: %w", f, f.dir, err))
		if err := sleep(ctx, retry.NextBackOff()); err != nil {
			return err
		}
	}
}

var errDirGone = errors.New("directory removed or moved")

// maxSettle is the longest a burst of events delays a read.
const maxSettle = time.Second

// watchDir watches the directory until ctx ends or the watch breaks;
// watching calls ok once the watch is in place.
func (f *file) watchDir(ctx context.Context, apply func(*groups.Config) error, ok func()) error {
	w, err := fsnotify.NewWatcher()
	if err != nil {
		return err
	}
	defer w.Close()
	if err := w.Add(f.dir); err != nil {
		return err
	}
	ok()
	// The file may be a symlink to a file in another directory, whose
	// in-place edits show only there, and a directory on its path may be
	// a symlink re-pointed by a swap in the directory holding it: watch
	// those directories too, and follow the links again before every
	// read, as they may have been re-pointed.
	realDir, err := filepath.EvalSymlinks(f.dir)
	if err != nil {
		realDir = f.dir
	}
	watched := map[string]bool{} // the other directories watched
	follow := func() {
		want := f.linkDirs(realDir)
		for d := range watched {
			if !want[d] {
				_ = w.Remove(d) // gone already when the directory was removed
				delete(watched, d)
			}
		}
		for d := range want {
			if watched[d] {
				continue
			}
			if err := w.Add(d); err != nil {
				f.r.log.Warn("cannot watch a directory the groups file's path runs through; its changes may be missed", "directory", d, "error", err)
				continue
			}
			watched[d] = true
		}
	}
	// Read once the watch is in place, so that no change slips between
	// the read and the watch.
	follow()
	f.read(apply)

	debounce := time.NewTimer(time.Hour)
	debounce.Stop()
	defer debounce.Stop()
	// Each event pushes the read back, so that a file written in several
	// steps is read once, whole; but a burst delays it by maxSettle at
	// most, or a neighbour written without pause (a log, a lock file)
	// would postpone it forever.
	var burst time.Time // zero when no read is due
	settle := func() {
		now := time.Now()
		if burst.IsZero() {
			burst = now
		}
		wait := f.opts.Debounce
		if latest := burst.Add(max(maxSettle, f.opts.Debounce)); now.Add(wait).After(latest) {
			wait = latest.Sub(now)
		}
		debounce.Reset(wait)
	}
	for {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case ev, open := <-w.Events:
			if !open {
				return errors.New("watcher closed")
			}
			if ev.Name == f.dir && ev.Has(fsnotify.Remove|fsnotify.Rename) {
				return errDirGone
			}
			if watched[ev.Name] && ev.Has(fsnotify.Remove|fsnotify.Rename) {
				// Its watch went with it: a directory put in its place
				// under the same name needs one of its own, which follow
				// adds only for a directory it does not watch yet.
				_ = w.Remove(ev.Name) // gone already when it was removed
				delete(watched, ev.Name)
			}
			// Any change in the directory may be ours (a symlink chain
			// can run through other names in it); reading is cheap and
			// an unchanged file is skipped by its hash.
			settle()
		case err, open := <-w.Errors:
			if !open {
				return errors.New("watcher closed")
			}
			if errors.Is(err, fsnotify.ErrEventOverflow) {
				// Events were lost: read to be sure.
				settle()
				continue
			}
			return err
		case <-debounce.C:
			burst = time.Time{}
			follow()
			f.read(apply)
		}
	}
}

// linkDirs returns the directories besides the one watched (realDir, as
// resolved) where a change may change what the path reads: the directory
// the file links into, and the directory holding each symlink among the
// path's directories, where re-pointing it shows (ln -sfn, as deployment
// tools switch a "current" release, keeping the old one, whose directory
// sees nothing).
func (f *file) linkDirs(realDir string) map[string]bool {
	dirs := map[string]bool{}
	// By their resolved names, so that no directory is watched twice
	// under two names (they would share one inotify watch).
	add := func(d string) {
		if r, err := filepath.EvalSymlinks(d); err == nil && r != realDir {
			dirs[r] = true
		}
	}
	if p, err := filepath.EvalSymlinks(f.path); err == nil {
		add(filepath.Dir(p))
	}
	for d := f.dir; filepath.Dir(d) != d; d = filepath.Dir(d) {
		if fi, err := os.Lstat(d); err == nil && fi.Mode()&os.ModeSymlink != 0 {
			add(filepath.Dir(d))
		}
	}
	return dirs
}

func (f *file) read(apply func(*groups.Config) error) {
	data, err := readFile(f.path, f.opts.MaxBytes)
	if err != nil {
		f.r.fail(fmt.Errorf("%s: %w", f, err))
		return
	}
	_ = f.r.offer(data, apply) // logged and counted by offer
}
