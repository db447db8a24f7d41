// Command composecheck loads a Compose file with compose-go, the loader `docker compose` uses,
// with every profile enabled, and checks what `docker compose up` needs beyond a valid file:
// every service has an image or a build; build contexts and Dockerfiles exist and parse, their
// targets and build args are declared; bind-mounted files and folders exist; a dependency waited
// on as healthy has a healthcheck, one waited on to complete does not restart; services sharing
// an image tag build it the same way; published ports do not collide; images are pinned.
//
// Usage: composecheck [-json FILE] [-images FILE] COMPOSE_FILE
//
// Exit status: 0 when all is well; 1 with one line per problem on stderr; 2 when the file cannot
// be loaded (compose-go's error) or the usage is wrong. -json writes the loaded project (paths
// resolved, every profile in) for further checks; -images writes, per service built from a
// Dockerfile, what its image runs as: {"service": {"dockerfile", "target", "user", "healthcheck",
// "entrypoint", "cmd"}}.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"sort"
	"strings"

	"github.com/compose-spec/compose-go/v2/cli"
	"github.com/compose-spec/compose-go/v2/types"
	"github.com/distribution/reference"
	"github.com/moby/buildkit/frontend/dockerfile/instructions"
	"github.com/moby/buildkit/frontend/dockerfile/parser"
)

func main() {
	jsonOut := flag.String("json", "", "write the loaded project as JSON to this file")
	imagesOut := flag.String("images", "", "write what each built image runs as (user, healthcheck, entrypoint) as JSON to this file")
	flag.Usage = func() {
		fmt.Fprintln(os.Stderr, "usage: composecheck [-json FILE] [-images FILE] COMPOSE_FILE")
		flag.PrintDefaults()
	}
	flag.Parse()
	if flag.NArg() != 1 {
		flag.Usage()
		os.Exit(2)
	}
	project, err := load(flag.Arg(0))
	if err != nil {
		fmt.Fprintf(os.Stderr, "composecheck: %s: %v\n", flag.Arg(0), err)
		os.Exit(2)
	}
	if *jsonOut != "" {
		data, err := project.MarshalJSON()
		if err == nil {
			err = os.WriteFile(*jsonOut, data, 0o644)
		}
		if err != nil {
			fmt.Fprintf(os.Stderr, "composecheck: -json %s: %v\n", *jsonOut, err)
			os.Exit(2)
		}
	}
	problems, images := check(project)
	if *imagesOut != "" {
		data, err := json.MarshalIndent(images, "", "  ")
		if err == nil {
			err = os.WriteFile(*imagesOut, data, 0o644)
		}
		if err != nil {
			fmt.Fprintf(os.Stderr, "composecheck: -images %s: %v\n", *imagesOut, err)
			os.Exit(2)
		}
	}
	for _, problem := range problems {
		fmt.Fprintln(os.Stderr, problem)
	}
	if len(problems) > 0 {
		fmt.Fprintf(os.Stderr, "composecheck: %s: %d problem(s)\n", flag.Arg(0), len(problems))
		os.Exit(1)
	}
	fmt.Printf("composecheck: %s: %d services, %d volumes: ok\n", flag.Arg(0), len(project.Services), len(project.Volumes))
}

// load reads the file as `docker compose --profile '*' config` would, without the caller's
// environment or .env file, so that the result does not depend on who runs it.
func load(path string) (*types.Project, error) {
	abs, err := filepath.Abs(path)
	if err != nil {
		return nil, err
	}
	options, err := cli.NewProjectOptions(
		[]string{abs},
		cli.WithWorkingDirectory(filepath.Dir(abs)),
		cli.WithName("composecheck"),
		cli.WithProfiles([]string{"*"}),
	)
	if err != nil {
		return nil, err
	}
	return options.LoadProject(context.Background())
}

// image is what a container of a Dockerfile's stage runs as, as far as the Dockerfile says
// (a stage built FROM an earlier stage inherits it; FROM an external image starts empty).
type image struct {
	Dockerfile  string   `json:"dockerfile"`
	Target      string   `json:"target"`
	User        string   `json:"user"`
	Healthcheck bool     `json:"healthcheck"`
	Entrypoint  []string `json:"entrypoint"`
	Cmd         []string `json:"cmd"`
}

// dockerfile is what the checks need of a parsed Dockerfile.
type dockerfile struct {
	stages map[string]bool  // named stages (FROM ... AS name)
	args   map[string]bool  // every ARG, before or in a stage
	images map[string]image // stage name (and "" for the last stage) -> its image
}

func parseDockerfile(path string) (*dockerfile, error) {
	file, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer file.Close()
	ast, err := parser.Parse(file)
	if err != nil {
		return nil, err
	}
	stages, metaArgs, err := instructions.Parse(ast.AST, nil)
	if err != nil {
		return nil, err
	}
	parsed := &dockerfile{map[string]bool{}, map[string]bool{}, map[string]image{}}
	for _, meta := range metaArgs {
		for _, arg := range meta.Args {
			parsed.args[arg.Key] = true
		}
	}
	for i, stage := range stages {
		facts := parsed.images[stage.BaseName] // zero for an external base image
		for _, command := range stage.Commands {
			switch c := command.(type) {
			case *instructions.ArgCommand:
				for _, arg := range c.Args {
					parsed.args[arg.Key] = true
				}
			case *instructions.HealthCheckCommand:
				facts.Healthcheck = c.Health != nil && !(len(c.Health.Test) == 1 && c.Health.Test[0] == "NONE")
			case *instructions.UserCommand:
				facts.User = c.User
			case *instructions.EntrypointCommand:
				facts.Entrypoint, facts.Cmd = commandLine(c.ShellDependantCmdLine), nil // ENTRYPOINT resets CMD
			case *instructions.CmdCommand:
				facts.Cmd = commandLine(c.ShellDependantCmdLine)
			}
		}
		facts.Dockerfile, facts.Target = path, stage.Name
		if stage.Name != "" {
			parsed.stages[stage.Name] = true
			parsed.images[stage.Name] = facts
		}
		if i == len(stages)-1 {
			parsed.images[""] = facts
		}
	}
	return parsed, nil
}

func commandLine(line instructions.ShellDependantCmdLine) []string {
	if line.PrependShell {
		return append([]string{"/bin/sh", "-c"}, strings.Join(line.CmdLine, " "))
	}
	return line.CmdLine
}

func check(project *types.Project) ([]string, map[string]image) {
	var problems []string
	images := map[string]image{}
	report := func(service, format string, args ...any) {
		problems = append(problems, fmt.Sprintf("service %s: %s", service, fmt.Sprintf(format, args...)))
	}
	names := make([]string, 0, len(project.Services))
	for name := range project.Services {
		names = append(names, name)
	}
	sort.Strings(names)

	builds := map[string]*types.BuildConfig{}
	buildOwner := map[string]string{}
	ports := map[string]string{}
	for _, name := range names {
		service := project.Services[name]
		if service.Image == "" && service.Build == nil {
			report(name, "has neither image nor build")
		}
		if service.Build == nil && service.Image != "" {
			ref, err := reference.ParseNormalizedNamed(service.Image)
			if err != nil {
				report(name, "image %q: %v", service.Image, err)
			} else if tagged, ok := ref.(reference.Tagged); !ok || tagged.Tag() == "latest" {
				if _, digested := ref.(reference.Digested); !digested {
					report(name, "image %q is not pinned to a version tag or digest", service.Image)
				}
			}
		}
		if service.Build != nil {
			if built, ok := checkBuild(name, service.Build, report); ok {
				images[name] = built
			}
			if service.Image != "" {
				if other, seen := builds[service.Image]; seen && !reflect.DeepEqual(other, service.Build) {
					report(name, "builds image %q differently from service %s", service.Image, buildOwner[service.Image])
				} else if !seen {
					builds[service.Image], buildOwner[service.Image] = service.Build, name
				}
			}
		}
		for _, volume := range service.Volumes {
			switch volume.Type {
			case types.VolumeTypeBind:
				if _, err := os.Stat(volume.Source); err != nil {
					report(name, "bind mount source %s does not exist", volume.Source)
				}
			case types.VolumeTypeVolume:
				if volume.Source != "" {
					if _, declared := project.Volumes[volume.Source]; !declared {
						report(name, "volume %q is not declared under volumes", volume.Source)
					}
				}
			}
		}
		for _, file := range service.EnvFiles {
			if _, err := os.Stat(file.Path); err != nil && file.Required {
				report(name, "env_file %s does not exist", file.Path)
			}
		}
		for _, port := range service.Ports {
			if port.Published == "" {
				continue
			}
			key := fmt.Sprintf("%s:%s/%s", port.HostIP, port.Published, port.Protocol)
			if other, taken := ports[key]; taken {
				report(name, "publishes %s, already published by service %s", key, other)
			}
			ports[key] = name
		}
	}
	for _, name := range names {
		service := project.Services[name]
		for depName, dep := range service.DependsOn {
			target, ok := project.Services[depName]
			if !ok {
				report(name, "depends on %s, which is not a service", depName)
				continue
			}
			switch dep.Condition {
			case types.ServiceConditionHealthy:
				own := target.HealthCheck != nil && !target.HealthCheck.Disable && len(target.HealthCheck.Test) > 0
				inherited := target.HealthCheck == nil && images[depName].Healthcheck
				if !own && !inherited {
					report(name, "waits for %s to be healthy, but %s has no healthcheck", depName, depName)
				}
			case types.ServiceConditionCompletedSuccessfully:
				if target.Restart != "" && target.Restart != types.RestartPolicyNo {
					report(name, "waits for %s to complete, but %s restarts (%s)", depName, depName, target.Restart)
				}
			}
			if !profilesCover(target.Profiles, service.Profiles) {
				report(name, "depends on %s, which is not started under every profile that starts %s", depName, name)
			}
		}
	}
	for _, secret := range project.Secrets {
		if secret.File != "" {
			if _, err := os.Stat(secret.File); err != nil {
				problems = append(problems, fmt.Sprintf("secret %s: file %s does not exist", secret.Name, secret.File))
			}
		}
	}
	for _, config := range project.Configs {
		if config.File != "" {
			if _, err := os.Stat(config.File); err != nil {
				problems = append(problems, fmt.Sprintf("config %s: file %s does not exist", config.Name, config.File))
			}
		}
	}
	return problems, images
}

// checkBuild checks the build context, Dockerfile, target and args; returns what the image
// built runs as, when its Dockerfile could be read.
func checkBuild(name string, build *types.BuildConfig, report func(string, string, ...any)) (image, bool) {
	if strings.Contains(build.Context, "://") || strings.HasPrefix(build.Context, "git@") {
		return image{}, false // a remote context: nothing on disk to check
	}
	if info, err := os.Stat(build.Context); err != nil || !info.IsDir() {
		report(name, "build context %s is not a folder", build.Context)
		return image{}, false
	}
	if build.DockerfileInline != "" {
		return image{}, false
	}
	path := build.Dockerfile
	if path == "" {
		path = "Dockerfile"
	}
	if !filepath.IsAbs(path) {
		path = filepath.Join(build.Context, path)
	}
	parsed, err := parseDockerfile(path)
	if err != nil {
		report(name, "Dockerfile %s: %v", path, err)
		return image{}, false
	}
	if build.Target != "" && !parsed.stages[build.Target] {
		report(name, "build target %q is not a stage of %s", build.Target, path)
	}
	for arg := range build.Args {
		if !parsed.args[arg] {
			report(name, "build arg %s is not declared (ARG) in %s", arg, path)
		}
	}
	built, ok := parsed.images[build.Target]
	return built, ok
}

// profilesCover: a service with dependentProfiles only starts when its dependency does too.
func profilesCover(dependencyProfiles, dependentProfiles []string) bool {
	if len(dependencyProfiles) == 0 {
		return true
	}
	if len(dependentProfiles) == 0 {
		return false
	}
	for _, profile := range dependentProfiles {
		found := false
		for _, other := range dependencyProfiles {
			found = found || other == profile
		}
		if !found {
			return false
		}
	}
	return true
}
