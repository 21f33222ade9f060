package sources

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/reverst-dev/reverst/groups"
	"github.com/reverst-dev/reverst/internal/testlog"
)

func openFile(t *testing.T, path string) (Source, *prometheus.Registry) {
	t.Helper()
	reg := prometheus.NewRegistry()
	src, err := Open(path, Options{Registerer: reg, Debounce: 20e6})
	if err != nil {
		t.Fatal(err)
	}
	return src, reg
}

func writeFile(t *testing.T, path string, data []byte) {
	t.Helper()
	if err := os.WriteFile(path, data, 0o644); err != nil {
		t.Fatal(err)
	}
}

// kubeVolume lays out dir the way the kubelet does for a ConfigMap
// volume: groups.yml -> ..data/groups.yml, ..data -> ..<version>.
func kubeVolume(t *testing.T, dir, version string, data []byte) {
	t.Helper()
	ts := filepath.Join(dir, ".."+version)
	if err := os.Mkdir(ts, 0o755); err != nil {
		t.Fatal(err)
	}
	writeFile(t, filepath.Join(ts, "groups.yml"), data)
	tmp := filepath.Join(dir, "..data_tmp")
	if err := os.Symlink(".."+version, tmp); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, filepath.Join(dir, "..data")); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Lstat(filepath.Join(dir, "groups.yml")); errors.Is(err, os.ErrNotExist) {
		if err := os.Symlink(filepath.Join("..data", "groups.yml"), filepath.Join(dir, "groups.yml")); err != nil {
			t.Fatal(err)
		}
	}
}

func TestFileChangeStyles(t *testing.T) {
	for _, tc := range []struct {
		name string
		// change replaces the definition with data; n counts the changes.
		change func(t *testing.T, dir, path string, data []byte, n int)
	}{{
		name: "write in place",
		change: func(t *testing.T, dir, path string, data []byte, n int) {
			writeFile(t, path, data)
		},
	}, {
		name: "write temp and rename",
		change: func(t *testing.T, dir, path string, data []byte, n int) {
			tmp := filepath.Join(dir, ".groups.yml.swp")
			writeFile(t, tmp, data)
			if err := os.Rename(tmp, path); err != nil {
				t.Fatal(err)
			}
		},
	}, {
		name: "delete and recreate",
		change: func(t *testing.T, dir, path string, data []byte, n int) {
			if err := os.Remove(path); err != nil {
				t.Fatal(err)
			}
			writeFile(t, path, data)
		},
	}, {
		name: "kubernetes symlink swap",
		change: func(t *testing.T, dir, path string, data []byte, n int) {
			kubeVolume(t, dir, fmt.Sprintf("2026_01_01_00_00_%02d.%d", n, n), data)
			if n > 0 {
				old := filepath.Join(dir, fmt.Sprintf("..2026_01_01_00_00_%02d.%d", n-1, n-1))
				if err := os.RemoveAll(old); err != nil {
					t.Fatal(err)
				}
			}
		},
	}, {
		name: "directory removed and recreated",
		change: func(t *testing.T, dir, path string, data []byte, n int) {
			if err := os.RemoveAll(dir); err != nil {
				t.Fatal(err)
			}
			if err := os.Mkdir(dir, 0o755); err != nil {
				t.Fatal(err)
			}
			writeFile(t, path, data)
		},
	}} {
		t.Run(tc.name, func(t *testing.T) {
			dir := filepath.Join(t.TempDir(), "config")
			if err := os.Mkdir(dir, 0o755); err != nil {
				t.Fatal(err)
			}
			path := filepath.Join(dir, "groups.yml")
			if tc.name == "kubernetes symlink swap" {
				tc.change(t, dir, path, definition("a"), 0)
			} else {
				writeFile(t, path, definition("a"))
			}
			src, reg := openFile(t, path)
			cfg, err := src.Load(context.Background())
			if err != nil {
				t.Fatal(err)
			}
			if got := cfg.Names(); !slices.Equal(got, []string{"a"}) {
				t.Fatalf("Load: groups %v, want [a]", got)
			}
			a := newApplied()
			watch(t, src, a)

			// The first change may be caught by Watch's initial read; once
			// it is applied that read is behind us, so the second change
			// can only be seen through the watch.
			tc.change(t, dir, path, definition("b"), 1)
			a.waitLast(t, "b")
			tc.change(t, dir, path, definition("c"), 2)
			a.waitLast(t, "c")
			eventually(t, "healthy after a good change", func() bool { return src.Status() == nil })
			// Load's definition is never applied again, and each change
			// is applied once.
			if calls, want := a.snapshot(), [][]string{{"b"}, {"c"}}; !slices.EqualFunc(calls, want, slices.Equal) {
				t.Errorf("applied %v, want %v", calls, want)
			}
			// apply returns before the success is counted.
			eventually(t, "3 successes (load and two changes)", func() bool { return reloads(t, reg, src.String(), "success") == 3 })
		})
	}
}

func TestFileBrokenEditKeepsLastGood(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "groups.yml")
	writeFile(t, path, definition("a"))
	src, reg := openFile(t, path)
	if _, err := src.Load(context.Background()); err != nil {
		t.Fatal(err)
	}
	loaded := lastSuccess(t, reg, src.String())
	if loaded == 0 {
		t.Fatal("last success gauge not set by Load")
	}
	a := newApplied()
	watch(t, src, a)

	writeFile(t, path, broken)
	// An in-place write may first be read half done; the verdict that
	// counts names the group and field at fault.
	eventually(t, "broken edit reported", func() bool {
		err := src.Status()
		return err != nil && strings.Contains(err.Error(), `group "x": hosts`)
	})
	eventually(t, "failure counted", func() bool { return reloads(t, reg, src.String(), "failure") >= 1 })
	if calls := a.snapshot(); len(calls) != 0 {
		t.Fatalf("a broken definition was applied: %v", calls)
	}

	// Rewriting what is in force is no reload; the next real change is.
	writeFile(t, path, definition("a"))
	eventually(t, "healthy again", func() bool { return src.Status() == nil })
	writeFile(t, path, definition("c"))
	a.waitLast(t, "c")
	if calls := a.snapshot(); len(calls) != 1 {
		t.Errorf("applied %v, want only [c]", calls)
	}
}

func TestFileApplyErrorCountsAsFailure(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "groups.yml")
	writeFile(t, path, definition("a"))
	src, reg := openFile(t, path)
	a := newApplied()
	a.err = errors.New("refused")
	watch(t, src, a)
	a.waitLast(t, "a")
	eventually(t, "failure counted", func() bool { return reloads(t, reg, src.String(), "failure") == 1 })
	if err := src.Status(); err == nil || !strings.Contains(err.Error(), "refused") {
		t.Errorf("Status = %v, want the apply error", err)
	}
	if got := reloads(t, reg, src.String(), "success"); got != 0 {
		t.Errorf("success reloads = %v, want 0", got)
	}
}

func TestFileMissingThenCreated(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "groups.yml")
	src, _ := openFile(t, path)
	if err := src.Status(); !errors.Is(err, ErrNotLoaded) {
		t.Errorf("Status before any read = %v, want ErrNotLoaded", err)
	}
	if _, err := src.Load(context.Background()); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("Load of a missing file: %v, want ErrNotExist", err)
	}
	if err := src.Status(); err == nil {
		t.Fatal("Status nil before any definition")
	}
	a := newApplied()
	watch(t, src, a)
	writeFile(t, path, definition("a"))
	a.waitLast(t, "a")
}

// A source that fails before any definition was loaded says so, instead
// of claiming to keep a last good definition it never had.
func TestFileFailingLogsWhetherADefinitionIsKept(t *testing.T) {
	path := filepath.Join(t.TempDir(), "groups.yml")
	logger, logs := testlog.Debug()
	src, err := Open(path, Options{Logger: logger, Registerer: prometheus.NewRegistry()})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := src.Load(context.Background()); err == nil {
		t.Fatal("Load of a missing file succeeded")
	}
	if got := logs.String(); strings.Contains(got, "last good") || !strings.Contains(got, "no definition loaded yet") {
		t.Fatalf("log of a first load that failed:\n%s", got)
	}
	writeFile(t, path, definition("a"))
	if _, err := src.Load(context.Background()); err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(path); err != nil {
		t.Fatal(err)
	}
	if _, err := src.Load(context.Background()); err == nil {
		t.Fatal("Load of a removed file succeeded")
	}
	if got := logs.String(); !strings.Contains(got, "keeping the last good definition") {
		t.Fatalf("log of a load that failed after a good one:\n%s", got)
	}
}

func TestFileTooLarge(t *testing.T) {
	path := filepath.Join(t.TempDir(), "groups.yml")
	writeFile(t, path, definition("a"))
	src, err := Open(path, Options{MaxBytes: 10})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := src.Load(context.Background()); !errors.Is(err, errTooLarge) {
		t.Fatalf("Load: %v, want errTooLarge", err)
	}
}

// A file beside ours written more often than the debounce (a log, a lock
// file) delays a reload by a second at most, not forever.
func TestFileReloadWithBusyNeighbour(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "groups.yml")
	if err := os.WriteFile(path, []byte(`groups: {a: {hosts: [a.example]}}`), 0o644); err != nil {
		t.Fatal(err)
	}
	src, err := Open(path, Options{Debounce: 150 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := src.Load(context.Background()); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	applied := make(chan *groups.Config, 10)
	go func() {
		_ = src.Watch(ctx, func(c *groups.Config) error { applied <- c; return nil })
	}()
	go func() { // a file beside it, appended to every 50 ms
		f, err := os.Create(filepath.Join(dir, "app.log"))
		if err != nil {
			return
		}
		defer f.Close()
		for ctx.Err() == nil {
			_, _ = f.WriteString("line\n")
			time.Sleep(50 * time.Millisecond)
		}
	}()
	time.Sleep(300 * time.Millisecond)
	if err := os.WriteFile(path+".tmp", []byte(`groups: {b: {hosts: [b.example]}}`), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(path+".tmp", path); err != nil {
		t.Fatal(err)
	}
	select {
	case c := <-applied:
		if _, ok := c.Groups["b"]; !ok {
			t.Fatalf("applied %v", c.Names())
		}
	case <-time.After(3 * time.Second):
		t.Fatal("the edit was not applied within 3s")
	}
}

// watchSymlinked makes ROOT/etc/groups.yml a symlink to
// ROOT/DIRS[0]/groups.yml, which holds group a, creates the other dirs,
// and watches it. It returns once Watch's first read has passed, so that
// only the watch can see what follows.
func watchSymlinked(t *testing.T, dirs ...string) (root, path string, a *applied) {
	t.Helper()
	root = t.TempDir()
	for _, d := range append([]string{"etc"}, dirs...) {
		if err := os.Mkdir(filepath.Join(root, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	path = filepath.Join(root, "etc", "groups.yml")
	writeFile(t, filepath.Join(root, dirs[0], "groups.yml"), definition("a"))
	if err := os.Symlink(filepath.Join(root, dirs[0], "groups.yml"), path); err != nil {
		t.Fatal(err)
	}
	src, _ := openFile(t, path)
	if _, err := src.Load(context.Background()); err != nil {
		t.Fatal(err)
	}
	a = newApplied()
	watch(t, src, a)
	eventually(t, "healthy", func() bool { return src.Status() == nil })
	time.Sleep(100 * time.Millisecond)
	return root, path, a
}

// A groups file that is a symlink to a file in another directory (kept
// there by a configuration tool, say) is edited where it lives: the change
// shows in that directory, not in the link's, and must be seen all the
// same, also after the link is pointed at a third directory.
func TestFileSymlinkToAnotherDirectory(t *testing.T) {
	root, path, a := watchSymlinked(t, "v1", "v2")

	writeFile(t, filepath.Join(root, "v1", "groups.yml"), definition("b"))
	a.waitLast(t, "b")

	// Re-point the link (seen in etc/), then edit the new target in place.
	writeFile(t, filepath.Join(root, "v2", "groups.yml"), definition("c"))
	tmp := filepath.Join(root, "etc", ".groups.yml.tmp")
	if err := os.Symlink(filepath.Join(root, "v2", "groups.yml"), tmp); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, path); err != nil {
		t.Fatal(err)
	}
	a.waitLast(t, "c")
	writeFile(t, filepath.Join(root, "v2", "groups.yml"), definition("d"))
	a.waitLast(t, "d")
	// The old target is no longer the definition.
	writeFile(t, filepath.Join(root, "v1", "groups.yml"), definition("e"))
	time.Sleep(200 * time.Millisecond)
	if calls, want := a.snapshot(), [][]string{{"b"}, {"c"}, {"d"}}; !slices.EqualFunc(calls, want, slices.Equal) {
		t.Errorf("applied %v, want %v", calls, want)
	}
}

// The directory a symlinked groups file points into may be replaced whole
// under the same name (a deployment removing it and putting a new one in
// its place): its watch went with the old directory, and edits made in
// place in the new one must still be seen.
func TestFileSymlinkTargetDirectoryReplaced(t *testing.T) {
	root, _, a := watchSymlinked(t, "conf")

	// The new directory is prepared beside the old one, then put in its
	// place.
	next := filepath.Join(root, "conf.next")
	if err := os.Mkdir(next, 0o755); err != nil {
		t.Fatal(err)
	}
	writeFile(t, filepath.Join(next, "groups.yml"), definition("b"))
	if err := os.RemoveAll(filepath.Join(root, "conf")); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(next, filepath.Join(root, "conf")); err != nil {
		t.Fatal(err)
	}
	a.waitLast(t, "b")
	writeFile(t, filepath.Join(root, "conf", "groups.yml"), definition("c"))
	a.waitLast(t, "c")
}

// The groups file's directory may itself be a symlink re-pointed at a new
// directory (ln -sfn, as deployment tools switch a "current" release), with
// the old directory kept. The swap shows only in the directory holding the
// link, and must be seen all the same, as must in-place edits in the new
// directory afterwards.
func TestFileDirectorySymlinkSwap(t *testing.T) {
	root := t.TempDir()
	for _, d := range []string{"v1", "v2"} {
		if err := os.Mkdir(filepath.Join(root, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	writeFile(t, filepath.Join(root, "v1", "groups.yml"), definition("a"))
	writeFile(t, filepath.Join(root, "v2", "groups.yml"), definition("b"))
	current := filepath.Join(root, "current")
	if err := os.Symlink("v1", current); err != nil {
		t.Fatal(err)
	}
	src, _ := openFile(t, filepath.Join(current, "groups.yml"))
	if _, err := src.Load(context.Background()); err != nil {
		t.Fatal(err)
	}
	a := newApplied()
	watch(t, src, a)
	eventually(t, "healthy", func() bool { return src.Status() == nil })
	time.Sleep(100 * time.Millisecond) // past Watch's first read

	tmp := filepath.Join(root, ".current.tmp")
	if err := os.Symlink("v2", tmp); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, current); err != nil {
		t.Fatal(err)
	}
	a.waitLast(t, "b")
	writeFile(t, filepath.Join(root, "v2", "groups.yml"), definition("c"))
	a.waitLast(t, "c")
}
