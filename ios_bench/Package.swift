// swift-tools-version:5.9
// Core ML latency harness for mobile-vmoe: writes the bench result schema 1.0 (docs/BENCH_SCHEMA.md).
import PackageDescription

let package = Package(
    name: "VMoEBench",
    platforms: [.iOS(.v17), .macOS(.v14)],
    products: [
        .library(name: "VMoEBench", targets: ["VMoEBench"]),
        .executable(name: "vmoe-bench", targets: ["vmoe-bench"]),
    ],
    targets: [
        .target(name: "VMoEBench"),
        .executableTarget(name: "vmoe-bench", dependencies: ["VMoEBench"]),
        .testTarget(
            name: "VMoEBenchTests",
            dependencies: ["VMoEBench"],
            // `mobile-vmoe bench --target ios` stages the .mlpackage here before `xcodebuild test`.
            resources: [.copy("Models")]
        ),
    ]
)
